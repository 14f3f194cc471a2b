"""Images: a class-folder tree or a manifest, decoded by Ray Data's ``read_images``.

- **Folder tree**: ``ROOT/<class>/**`` are labeled images (the folder's name is the label),
  ``ROOT/<data.unlabeled_dir>/**`` (default ``unlabeled``) unlabeled ones, at any depth below
  those folders. Files directly in ROOT and files that are not images (by extension: png, jpg,
  jpeg, bmp, gif, tif, tiff, webp) are skipped with a warning.
- **Manifest**: a .csv or .parquet file with a string column ``path`` and a label column
  (``data.label_column`` if the file has it, else ``label``); an empty, null or -1 label marks
  an unlabeled image. Relative paths are relative to the manifest's folder; absolute paths and
  URIs (``s3://...``, one scheme for the whole manifest) are taken as they are.

Images are resized to ``data.image_size`` × ``data.image_size`` (a side, in pixels; bilinear, as
``read_images(size=...)`` does) or, when it is 0, must all have the first image's size (a
mixed-size set is a DataError naming two files and their sizes). Grey stays grey (1 channel)
and colour is RGB (3): every image is converted to the first image's kind (``1``, ``L``, ``LA``,
``I``, ``F`` modes are grey; alpha is dropped). Rows are ``(c, h, w)`` uint8 in the Ray Dataset,
float32 in [0, 1] once collected.

An image that fails to decode is an error naming the file, not skipped: a run on silently fewer
images than the user has would hide a broken copy (Ray also logs the read task's traceback).
Everything up to the decoding (the listing, the class folders, the first image's header, the
manifest) is checked on the driver before Ray starts.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from raysl.config import DataConfig
from raysl.errors import DataError
from raysl.readers.files import IMAGE_EXTENSIONS, Source, is_uri, kind_of
from raysl.readers.rows import cause_line, collect, label_values, tensor_to_numpy

T = TypeVar("T")

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray.data

    from raysl.data import Dataset, Split

logger = logging.getLogger("raysl")

# PIL modes read as grey (one channel); every other mode is read as RGB
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# when a read fails without naming its file, decode at most this many on the driver to find it
SCAN_LIMIT = 20000


def peek(fs: pafs.FileSystem, path: str) -> tuple[int, int, str]:
    """``(height, width, mode)`` of one image from its header (nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with fs.open_input_file(path) as f, Image.open(f) as im:
            return im.height, im.width, im.mode
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class ImagePlan:
    """Images to read: ``files`` in id order with their ``labels`` (``(n,)``, the user's
    labels; "" or -1 unlabeled), the first image's size and mode, decided on the driver
    without Ray. :meth:`dataset` makes the Ray Dataset, :meth:`read` collects it."""

    src: Source  # src.files: the images, in id order
    labels: np.ndarray  # (n,) str ("" unlabeled) or int64 (-1 unlabeled), ...
    first_hw: tuple[int, int]
    mode: str  # "L" or "RGB": what every image is converted to
    image_size: int  # 0: the first image's size, every image must have it
    label_source: str  # "folders", "csv" or "parquet" (a manifest): see rows.normalize_labels

    def dataset(self) -> ray.data.Dataset:
        """Columns ``id``, ``x`` uint8 ``(c, h, w)``, ``label``, ``path``, ``hw`` (the decoded
        ``(h, w)`` before any fix-up; a row whose ``hw`` differs from the first image's is
        all zeros). Needs a Ray session."""
        import ray

        size = (self.image_size, self.image_size) if self.image_size else None
        meta = ray.put(({p: i for i, p in enumerate(self.src.files)}, self.labels))
        ds = ray.data.read_images(list(self.src.files), filesystem=self.src.fs, size=size,
                                  mode=self.mode, include_paths=True, file_extensions=None)
        expect = None if self.image_size else self.first_hw
        return ds.map_batches(_image_rows, batch_format="numpy",
                              fn_kwargs={"meta": meta, "expect": expect})

    def read(self, name: str) -> Dataset:
        return self._reading(lambda ds, kw: collect(ds, name, self.src.what, extra=("path", "hw"),
                                                    **kw))

    def split(self, name: str, cfg: DataConfig) -> Split:
        from raysl.distributed.pool import distribute

        return self._reading(lambda ds, kw: distribute(ds, name, self.src.what, cfg, **kw))

    def _reading(self, how: Callable[[ray.data.Dataset, dict[str, Any]], T]) -> T:
        """``how(dataset, kwargs)`` with the checks and error explanations of this read."""
        what = self.src.what
        first = self.src.files[0]

        def check(batch: pa.Table) -> None:
            hw = tensor_to_numpy(batch.column("hw")).reshape(-1, 2)
            bad = np.where((hw != np.array(self.first_hw)).any(axis=1))[0]
            if len(bad):
                h, w = hw[bad[0]]
                raise DataError(
                    f"{what}: images of different sizes: {first} is {self.first_hw[0]}x"
                    f"{self.first_hw[1]} and {batch.column('path')[int(bad[0])]} is {h}x{w} "
                    "(height x width); set data.image_size to resize them all to one size")

        kw = {"check": None if self.image_size else check, "explain": self._explain,
              "labels": self.label_source}
        try:
            return how(self.dataset(), kw)
        except (OSError, ValueError) as e:  # from read_images' own listing of the files
            if isinstance(e, DataError):
                raise
            raise DataError(f"{what}: {cause_line(e)}") from None

    def _explain(self, e: BaseException) -> DataError | None:
        """A failed read as a DataError naming the image: Ray's message names a file PIL
        can't identify; other decoding errors (a truncated file) don't, so scan for it."""
        text = cause_line(e)
        m = re.search(r"couldn't load image file at path '(.+?)'", text)
        if m:
            return DataError(f"{self.src.what}: {m.group(1)}: not a readable image (PIL can't "
                             "identify it); remove or replace the file")
        bad = _first_undecodable(self.src.fs, self.src.files[:SCAN_LIMIT])
        if bad is not None:
            return DataError(f"{self.src.what}: {bad[0]}: not a readable image ({bad[1]}); "
                             "remove or replace the file")
        return DataError(f"{self.src.what}: decoding the images failed: {text}")


def _first_undecodable(fs: pafs.FileSystem, files: tuple[str, ...] | list[str]
                       ) -> tuple[str, str] | None:
    from PIL import Image

    for p in files:
        try:
            with fs.open_input_file(p) as f, Image.open(f) as im:
                im.load()
        except Exception as e:  # PIL raises many kinds: any means undecodable
            return p, f"{type(e).__name__}: {e}"
    return None


_META: dict[str, Any] = {}  # per worker process: the last read's (index, labels)


def _meta(ref: Any) -> tuple[dict[str, int], np.ndarray]:
    import ray

    key = ref.hex()
    if key not in _META:
        _META.clear()  # one read at a time: don't keep an old listing alive in the worker
        _META[key] = ray.get(ref)
    return _META[key]


def _image_rows(batch: dict[str, np.ndarray], meta: Any, expect: tuple[int, int] | None
                ) -> dict[str, np.ndarray]:
    """read_images' ``image`` (h, w[, c]) and ``path`` -> the reader's rows."""
    index, labels = _meta(meta)
    paths = batch["path"]
    ids = np.array([index[str(p)] for p in paths], np.int64)
    images = list(batch["image"])
    hw = np.array([im.shape[:2] for im in images], np.int32).reshape(-1, 2)
    if expect is not None:  # a mismatch is reported by the driver, naming both files
        images = [im if im.shape[:2] == expect else np.zeros(expect + im.shape[2:], im.dtype)
                  for im in images]
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (n, c, h, w)
    return {"id": ids, "x": np.ascontiguousarray(x), "label": labels[ids], "path": paths,
            "hw": hw}


def _plan(src: Source, files: list[str], labels: np.ndarray, cfg: DataConfig,
          label_source: str) -> ImagePlan:
    h, w, mode = peek(src.fs, files[0])
    return ImagePlan(Source(src.spec, src.fs, tuple(files), src.root), labels, (h, w),
                     "L" if mode in GREY_MODES else "RGB", cfg.image_size, label_source)


def plan_folder(src: Source, cfg: DataConfig) -> ImagePlan:
    """A class-folder tree: ``src.root/<class>/**`` labeled, ``src.root/<unlabeled_dir>/**``
    unlabeled. Raises DataError for a tree without class folders or with an empty one."""
    import pyarrow.fs as pafs

    assert src.root is not None
    root = src.root.rstrip("/")
    folders = sorted(posixpath.basename(i.path) for i in src.fs.get_file_info(
        pafs.FileSelector(root)) if i.type == pafs.FileType.Directory
        and not posixpath.basename(i.path).startswith((".", "_")))
    per_folder: dict[str, list[str]] = {f: [] for f in folders}
    skipped = 0
    for p in src.files:
        rel = p[len(root) + 1:]
        top = rel.split("/", 1)[0]
        if "/" not in rel or kind_of(p) != "image":
            skipped += 1
            continue
        per_folder[top].append(p)
    if skipped:
        logger.warning("%s: %d files skipped: not images (%s) in a class or %r folder", src.what,
                       skipped, ", ".join(IMAGE_EXTENSIONS), cfg.unlabeled_dir)
    classes = [f for f in folders if f != cfg.unlabeled_dir]
    if not classes:
        raise DataError(f"{src.what}: no class folders: expected ROOT/<class>/ folders of "
                        f"labeled images (and ROOT/{cfg.unlabeled_dir}/ for unlabeled ones); "
                        f"found {folders or 'none'}")
    empty = [f for f in classes if not per_folder[f]]
    if empty:
        raise DataError(f"{src.what}: class folder {posixpath.join(root, empty[0])!r} holds no "
                        f"images ({', '.join(IMAGE_EXTENSIONS)})"
                        + (f"; {len(empty) - 1} more are empty" if len(empty) > 1 else ""))
    files = sorted(p for f in folders for p in per_folder[f])
    label_of = {p: ("" if f == cfg.unlabeled_dir else f) for f in folders for p in per_folder[f]}
    labels = np.array([label_of[p] for p in files], dtype=str)
    return _plan(src, files, labels, cfg, "folders")


def plan_manifest(src: Source, schema: pa.Schema, fmt: str, cfg: DataConfig) -> ImagePlan:
    """A manifest file (a string column ``path``, one label column). Paths are checked to
    exist when they are local; duplicates are an error (a row's id is its image's)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from raysl.readers.files import filesystem
    from raysl.readers.tabular import csv_options, open_csv_stream

    names = schema.names
    label = next((c for c in (cfg.label_column, "label") if c in names), None)
    if label is None:
        raise DataError(f"{src.what}: a manifest (it has a 'path' column) needs a label column "
                        f"{cfg.label_column!r} (data.label_column) or 'label'; found "
                        f"{names[:20]}")
    path = src.files[0]
    try:
        if fmt == "parquet":
            with src.fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["path", label])
        else:
            convert = pacsv.ConvertOptions(include_columns=["path", label],
                                           column_types={"path": pa.string(),
                                                         label: pa.string()})
            with open_csv_stream(src.fs, path) as f:
                table = pacsv.read_csv(f, read_options=csv_options()["read_options"],
                                       convert_options=convert)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{src.what}: not a readable manifest ({cause_line(e)})") from None
    entries = table.column("path").to_pylist()
    labels = label_values(table.column(label))
    if not entries:
        raise DataError(f"{src.what}: an empty manifest (no rows)")
    blank = [i for i, p in enumerate(entries) if not p]
    if blank:
        raise DataError(f"{src.what}: {len(blank)} rows have no path (first row: {blank[0]})")
    uris = [p for p in entries if is_uri(p)]
    if uris:
        scheme = uris[0].split("://", 1)[0]
        if len(uris) != len(entries) or any(not p.startswith(scheme + "://") for p in uris):
            raise DataError(f"{src.what}: mixes {scheme}:// paths with others; use one "
                            "filesystem for every image")
        fs, _ = filesystem(uris[0])
        files = [p.split("://", 1)[1] for p in entries]
    else:
        fs, base = src.fs, posixpath.dirname(path)
        files = [posixpath.normpath(posixpath.join(base, p)) for p in entries]
    seen: dict[str, int] = {}
    for i, p in enumerate(files):
        if p in seen:
            raise DataError(f"{src.what}: {entries[i]!r} is listed twice (rows {seen[p]} and "
                            f"{i}); each image once")
        seen[p] = i
    if isinstance(fs, pafs.LocalFileSystem):  # cheap here; remote stores are checked by Ray
        infos = fs.get_file_info(files)
        missing = [entries[i] for i, info in enumerate(infos)
                   if info.type != pafs.FileType.File]
        if missing:
            raise DataError(f"{src.what}: {len(missing)} listed images don't exist (first: "
                            f"{missing[0]!r}; relative paths are relative to the manifest's "
                            "folder)")
    return _plan(Source(src.spec, fs, tuple(files)), files, labels, cfg, fmt)
