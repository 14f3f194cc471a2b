"""raysl.memory: freed heap memory goes back to the system (glibc); file-backed arrays; what a
process uses."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import numpy as np
import pytest

from raysl.memory import _malloc_trim, available_memory, disk_array, process_memory, trim


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None,
                    reason="glibc's malloc_trim (Linux)")
def test_trim_returns_freed_arrays_to_the_system() -> None:
    """What the pipeline's stages leave: after one large array is freed, glibc serves arrays
    of a few MB from its heap, and freeing them keeps them resident (small live objects
    between them stop the heap from shrinking). trim() gives them back."""
    big = np.ones(24 << 20, np.uint8)  # its free raises glibc's mmap threshold
    del big
    arrays, pins = [], []
    for _ in range(40):
        arrays.append(np.ones(2 << 20, np.uint8))  # 2 MB, touched
        pins.append(np.ones(64, np.uint8).tobytes() * 2)  # small, kept: fragments the heap
    del arrays
    before = _rss()
    assert trim() in (True, False)
    released = before - _rss()
    # ~32 MB here (glibc shrinks the top of the heap by itself; the rest is what trim frees)
    assert released > 16 << 20, f"released {released / 2**20:.1f} MB of the ~80 MB freed"
    assert len(pins) == 40


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc (Linux)")


def test_a_disk_array_holds_rows_and_leaves_no_file(tmp_path: object) -> None:
    d = str(tmp_path)
    a = disk_array((1000, 3, 4), d)
    assert a.shape == (1000, 3, 4) and a.dtype == np.float32 and not a.any()
    assert os.listdir(d) == []  # unlinked once mapped: nothing to clean up, even after a crash
    rows = np.random.default_rng(0).random((1000, 3, 4), dtype=np.float32)
    a[np.arange(999, -1, -1)] = rows[::-1]  # scattered writes, as a rank's read does
    np.testing.assert_array_equal(a[[5, 17, 999]], rows[[5, 17, 999]])
    assert disk_array((0, 3), d).shape == (0, 3)


@LINUX
def test_a_disk_arrays_rows_are_file_pages_not_heap(tmp_path: object) -> None:
    """What train.share_storage=disk is for: 64 MB of rows resident as file pages (which the
    kernel can write back and drop under pressure), not as the process's anonymous memory."""
    before = process_memory()
    a = disk_array((16, 1 << 20), str(tmp_path))  # 64 MB
    a[:] = 1.0
    after = process_memory()
    assert after["RssFile"] - before["RssFile"] > 48 << 20, (before, after)
    assert after["RssAnon"] - before["RssAnon"] < 16 << 20, (before, after)
    assert float(a.sum()) == 16 * (1 << 20)


@LINUX
def test_available_memory_is_what_the_kernel_reports() -> None:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    avail = available_memory()
    assert avail is not None and 0 < avail <= total


def test_where_a_worker_keeps_its_rows() -> None:
    """train.share_storage and backend.shard_storage."""
    from raysl.memory import DISK_SHARE, keep_on_disk

    gb = 1 << 30

    def node(n: int | None) -> Callable[[], int | None]:
        return lambda: n

    def rows(nbytes: int) -> tuple[int, ...]:  # float32 rows of nbytes (a multiple of 4)
        return (nbytes // 4,)

    assert not keep_on_disk("memory", rows(100 * gb), node(1 * gb))
    assert keep_on_disk("disk", rows(4), node(100 * gb))
    # auto: the heap unless the rows are more than DISK_SHARE of what the node has available
    assert not keep_on_disk("auto", rows(int(DISK_SHARE * 8 * gb)), node(8 * gb))
    assert keep_on_disk("auto", rows(int(DISK_SHARE * 8 * gb) + 4), node(8 * gb))
    assert not keep_on_disk("auto", rows(100 * gb), node(None))  # not known (no /proc): heap


def test_a_disk_array_without_room_is_a_clear_error_not_a_crash(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Space is reserved before any row is written: a full disk is an ENOSPC naming the
    directory (a sparse file would instead kill the process with SIGBUS on a write)."""
    import errno

    d = str(tmp_path)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=rf"0.01 GB of rows do not fit in {d} \(") as e:
        disk_array((10, 1 << 18), d)
    assert e.value.errno == errno.ENOSPC and os.listdir(d) == []

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)  # sized only: still an array
    a = disk_array((10, 4), d)
    a[3] = 7.0
    assert a.sum() == 28.0 and os.listdir(d) == []
