"""Where a user's data lives: ``data.dataset`` as a file, a folder, a glob or a URI, listed once
with pyarrow's filesystems (the same ones Ray Data reads through), before Ray starts.

No Ray here: listing is cheap and its failures (a missing path, an empty folder) are the user's
to fix before any expensive work.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from raysl.errors import DataError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

GLOB_CHARS = "*?["
# What Ray Data's read_images reads by default, plus webp; compared lower-cased.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp")
# Tabular formats by file name ending; CSV may be compressed (pyarrow infers the codec from it).
TABULAR_ENDINGS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv", ".csv.bz2": "csv",
                   ".csv.zst": "csv"}


def is_uri(spec: str) -> bool:
    return "://" in spec


def has_glob(spec: str) -> bool:
    return any(c in spec for c in GLOB_CHARS)


def kind_of(path: str) -> str:
    """``"parquet"``, ``"csv"``, ``"image"`` or ``"other"``, by the file name's ending."""
    name = path.rsplit("/", 1)[-1].lower()
    for ending, kind in TABULAR_ENDINGS.items():
        if name.endswith(ending):
            return kind
    if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and "." in name:
        return "image"
    return "other"


@dataclass(frozen=True)
class Source:
    """The files of ``data.dataset``, listed: ``files`` are paths in ``fs`` (no scheme), sorted,
    so a file's rank in them is stable. ``root`` is the folder given (None for a file or glob).
    Names starting with ``.`` or ``_`` (hidden files, ``_SUCCESS``, ``_metadata``) are skipped,
    as Ray Data's own listing skips them."""

    spec: str
    fs: pafs.FileSystem
    files: tuple[str, ...]
    root: str | None = None

    @property
    def what(self) -> str:
        """How error messages name the data: ``data.dataset='...'``."""
        return f"data.dataset={self.spec!r}"

    def by_kind(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for f in self.files:
            out.setdefault(kind_of(f), []).append(f)
        return out


def filesystem(spec: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``spec`` and the path inside it: a URI (``s3://bucket/key``,
    ``gs://...``, ``file:///...``) through :meth:`pyarrow.fs.FileSystem.from_uri`, anything
    else a local path (``~`` expanded, made absolute)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if is_uri(spec):
        try:
            return pafs.FileSystem.from_uri(spec)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise DataError(f"data.dataset={spec!r}: not a URI pyarrow can read "
                            f"({str(e).splitlines()[0][:160]})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))


def _visible(path: str, base: str = "") -> bool:
    """No name below ``base`` (or, without it, the file's own name) starts with . or _."""
    rel = path[len(base):] if base and path.startswith(base) else path.rsplit("/", 1)[-1]
    return not any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Every file below ``folder`` (recursively), sorted, hidden and ``_`` names skipped."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    return sorted(i.path for i in infos
                  if i.type == pafs.FileType.File and _visible(i.path, folder))


def _glob(spec: str, fs: pafs.FileSystem, pattern: str) -> list[str]:
    """Files matching ``pattern``: Python's glob for local paths (``**`` spans folders); for a
    URI, fnmatch over the listing below the pattern's fixed prefix (``*`` may span folders)."""
    import pyarrow.fs as pafs

    if not is_uri(spec):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if has_glob(p))
    base = "/".join(parts[:fixed])
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos
                  if i.type == pafs.FileType.File and fnmatchcase(i.path, pattern))


def looks_like_path(spec: str) -> bool:
    """A ``data.dataset`` that names files rather than a registered dataset."""
    return ("/" in spec or is_uri(spec) or has_glob(spec) or kind_of(spec) != "other"
            or spec.endswith(".npz") or os.path.exists(os.path.expanduser(spec)))


def find(spec: str) -> Source:
    """List ``spec``: one file, a folder (recursively), a glob, or any of these as a URI.
    Raises DataError for a path that doesn't exist, a glob that matches nothing and an empty
    folder."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from raysl.data import DATASETS

    fs, path = filesystem(spec)
    try:
        if has_glob(path):
            files = [f for f in _glob(spec, fs, path) if _visible(f)]
            if not files:
                raise DataError(f"data.dataset={spec!r}: the pattern matches no file")
            return Source(spec, fs, tuple(files))
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return Source(spec, fs, (path,))
        if info.type == pafs.FileType.Directory:
            files = list_files(fs, path)
            if not files:
                raise DataError(f"data.dataset={spec!r}: an empty folder (no files, hidden "
                                "and _ names aside)")
            return Source(spec, fs, tuple(files), root=path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data.dataset={spec!r}: can't list it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None
    raise DataError(f"data.dataset={spec!r}: no such file or folder (and not one of the "
                    f"named datasets: {', '.join(DATASETS)})")
