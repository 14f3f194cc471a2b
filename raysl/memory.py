"""Memory: giving freed memory back to the operating system between the pipeline's stages,
arrays kept on disk instead of the heap, and what a process uses.

The driver's per-row work (labels, ids, the split's indices, the pool's probabilities) makes
arrays of a few MB each that live for one step. glibc serves an allocation that large with its
own ``mmap`` and returns it to the system when it is freed, but each such free also raises the
threshold under which later allocations come from the heap (up to 32 MB on 64-bit Linux). From
then on freed arrays stay in the process as free heap: measured on ``raysl bench scale`` at
700,000 rows, the read + split step left 44 MB resident that was no longer used, and the
pseudo-label step 38 MB more. :func:`trim` asks glibc to release it (``malloc_trim(0)``, what
Dask's workers do through ``MALLOC_TRIM_THRESHOLD_``); elsewhere it does nothing.

:func:`disk_array` is where a shard actor or a Ray Train rank keeps rows too large for its
memory (``backend.shard_storage``, ``train.share_storage``; :func:`keep_on_disk` decides): a
file mapping whose pages the OS writes back and evicts under pressure, where heap pages could
only be swapped (or the process killed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger("raysl")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, or not Linux)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Return the process's free heap memory to the system; True when glibc released some
    (False: nothing to release, or no glibc). Cheap: a walk over the free lists."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


# storage "auto": rows go to disk above this part of the memory the node has available when
# they are read (a Train rank holds two fields; a node may run ranks and actors side by side)
DISK_SHARE = 0.25


def keep_on_disk(mode: str, shape: tuple[int, ...],
                 available: Callable[[], int | None] | None = None) -> bool:
    """Whether a worker keeps float32 rows of ``shape`` in a :func:`disk_array`: ``mode`` is
    ``train.share_storage`` or ``backend.shard_storage`` (memory, disk or auto: above
    :data:`DISK_SHARE` of the bytes ``available()`` says the node has, default
    :func:`available_memory`; memory when that is not known)."""
    if mode != "auto":
        return mode == "disk"
    free = (available or available_memory)()
    return free is not None and 4 * math.prod(shape) > DISK_SHARE * free


def disk_array(shape: tuple[int, ...], directory: str | None = None,
               random_access: bool = True) -> np.ndarray:
    """A zero-filled float32 array of ``shape`` backed by a file in ``directory`` (default:
    the system's temp directory, ``TMPDIR``) instead of the heap. The file is unlinked as soon
    as it is mapped, so its space is freed with the last reference to the array (or the
    process), and nothing is left behind, even after a crash. The disk space is reserved
    first: too little is an ``OSError`` (ENOSPC) naming the directory, not a SIGBUS when a
    row is written. ``random_access``: read-ahead off (rows drawn at random, as a Train rank
    draws them); else the kernel's default (rows read in order, as a shard actor projects
    them)."""
    count = math.prod(shape)
    if count == 0:
        return np.zeros(shape, np.float32)
    fd, path = tempfile.mkstemp(prefix="raysl-rows-", suffix=".f32", dir=directory)
    logger.info("[rows] %d rows (%.2f GB) in a file-backed array in %s", shape[0],
                count * 4 / 2**30, os.path.dirname(path))
    try:
        _reserve(fd, count * 4, os.path.dirname(path))
        buf = mmap.mmap(fd, count * 4)  # shared and writable: pages go back to the file
    finally:
        os.close(fd)
        os.unlink(path)
    if random_access and hasattr(buf, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # Rows are drawn at random. With the kernel's default read-ahead, a share twice its
        # cgroup's memory limit served 229 rows/s (each miss read ~128 KB around one 3 KB
        # row); without it, about 13,500 (scratch check, 96-row draws).
        buf.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(buf, np.float32, count).reshape(shape)


def _reserve(fd: int, nbytes: int, directory: str) -> None:
    """Size the file to ``nbytes`` with its blocks allocated (``posix_fallocate``), or only
    sized where the filesystem can't allocate ahead."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return
    except OSError as e:
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(directory).free
            raise OSError(errno.ENOSPC, f"{nbytes / 2**30:.2f} GB of rows do not fit in "
                          f"{directory} ({free / 2**30:.2f} GB free): point TMPDIR (of the Ray "
                          "workers) at a larger disk, or keep the rows in memory "
                          "(train.share_storage / backend.shard_storage=memory)") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    os.ftruncate(fd, nbytes)


def available_memory() -> int | None:
    """Bytes of memory available to new work on this node (Linux's ``MemAvailable``: free
    plus reclaimable), or None where /proc/meminfo is not there."""
    return _proc_fields(Path("/proc/meminfo")).get("MemAvailable")


def process_memory() -> dict[str, int]:
    """This process's memory in bytes, from /proc/self/status (Linux; {} elsewhere):
    ``VmHWM`` (peak resident), ``VmRSS`` (resident now), ``RssAnon`` (of it, heap and other
    anonymous pages) and ``RssFile`` (file pages, e.g. a :func:`disk_array`'s)."""
    fields = _proc_fields(Path("/proc/self/status"))
    return {k: fields[k] for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile") if k in fields}


def _proc_fields(path: Path) -> dict[str, int]:
    """``Name:  123 kB`` lines of a /proc file, in bytes."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if len(value) == 2 and value[1] == "kB" and value[0].isdigit():
            out[name] = int(value[0]) * 1024
    return out


__all__ = ["DISK_SHARE", "available_memory", "disk_array", "keep_on_disk", "process_memory",
           "trim"]
