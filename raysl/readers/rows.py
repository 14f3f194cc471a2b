"""The rows every reader produces, and their collection into a :class:`raysl.data.Dataset`.

A reader's Ray Dataset has these columns (one row per example):

- ``id``: int64, stable and in source order: a file's rank among the sorted files × 2^32 + the
  row's position in that file (tabular), or the image's rank among the sorted paths / the
  manifest's row (images). The same files always give the same ids, so a split can hash them.
- ``x``: the features, a tensor column: float32 ``(d,)`` (tabular) or uint8 ``(c, h, w)``
  (images; :func:`collect` scales them to [0, 1]).
- ``label``: the user's label as stored (string, integer, ...; null, empty or -1: unlabeled).

Readers may add columns (images: ``path``, ``hw``); :func:`collect` reads the three above.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from raysl.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from raysl.data import Dataset

ID_STRIDE = 1 << 32  # rows per file in the id space (tabular): 4 billion
ROW_ID = "_raysl_row_id"  # a tabular datasource's id column, before it becomes ``id``


def label_values(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A label column as numpy ``(n,)``: integers int64 (null -> -1), floats float64 (null ->
    NaN), strings ``<U`` (null -> ""), anything else as Python objects. No row is dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_null(t):
        return np.full(len(col), -1, np.int64)
    if pa.types.is_integer(t):
        return pc.fill_null(col, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_floating(t):
        return col.to_numpy(zero_copy_only=False).astype(np.float64)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return np.array(pc.fill_null(col, "").to_pylist(), dtype=str).reshape(-1)
    return np.array(col.to_pylist(), dtype=object)


def normalize_labels(y: np.ndarray, source: str) -> np.ndarray:
    """The label column of a whole dataset as :func:`raysl.data.encode_labels` takes it, by
    where the labels come from (``source``):

    - ``"csv"`` (untyped text): labels that are all numbers (``0,1,,-1``, or ``1.0``: pandas
      writes integer labels with gaps as floats) become numbers;
    - ``"csv"`` and ``"parquet"``: ``"-1"`` among string labels is unlabeled, as -1 is; floats
      that are all whole become int64 (NaN -> -1), so the classes are the integers;
    - ``"folders"``: the folder names, as they are (a folder ``7`` is the label ``"7"``).
    """
    if source == "folders":
        return y
    if y.dtype.kind == "U":
        filled = y != ""
        try:
            if source != "csv":
                raise ValueError("typed strings stay strings")
            numbers = y[filled].astype(np.float64)
        except ValueError:  # class names
            return np.where(y == "-1", "", y)
        if filled.any():
            out = np.full(len(y), np.nan)
            out[filled] = numbers
            y = out
    if y.dtype.kind == "f" and np.all(np.isnan(y) | (np.isfinite(y) & (y == np.round(y)))):
        return np.where(np.isnan(y), -1, y).astype(np.int64)
    return y  # non-integer floats: encode_labels names one


def tensor_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """A Ray tensor column (or a fixed-shape one) as one numpy array ``(n, ...)``."""
    chunks = [c.to_numpy() if hasattr(c, "to_numpy") else np.asarray(c) for c in col.chunks]
    chunks = [np.stack(list(c)) if c.dtype == object else c for c in chunks if len(c)]
    return np.concatenate(chunks) if chunks else np.zeros((0,))


def collect(ds: ray.data.Dataset, name: str, what: str, *, extra: tuple[str, ...] = (),
            check: Callable[[pa.Table], None] | None = None,
            explain: Callable[[BaseException], DataError | None] | None = None,
            labels: str = "parquet") -> Dataset:
    """Collect a reader's Ray Dataset (columns ``id``, ``x``, ``label``) into a
    :class:`raysl.data.Dataset` on the driver, rows in ``id`` order, labels mapped to 0..C-1
    with the user's labels in ``Dataset.classes`` (:func:`raysl.data._from_arrays`). Everything
    is read into memory: for data that fits on the driver.

    ``check`` sees each block (with the ``extra`` columns too) and may raise DataError;
    ``explain`` turns a failed read into a DataError (None: the generic one); ``labels``: where
    the labels come from (:func:`normalize_labels`)."""
    from raysl.data import _from_arrays

    ids: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for batch in iterate(ds.select_columns(["id", "x", "label", *extra]), what, explain):
        if check is not None:
            check(batch)
        ids.append(batch.column("id").to_numpy())
        xs.append(tensor_to_numpy(batch.column("x")))
        ys.append(label_values(batch.column("label")))
    if not ids:
        raise DataError(f"{what}: no rows")
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")
    x = np.concatenate(xs)[order]
    y = normalize_labels(np.concatenate(ys)[order], labels)
    return _from_arrays(name, x, y, ids=all_ids[order])


def iterate(ds: ray.data.Dataset, what: str,
            explain: Callable[[BaseException], DataError | None] | None = None
            ) -> Iterator[pa.Table]:
    """``ds``'s blocks as pyarrow tables. A failed read (a read task's error arrives as a
    RayTaskError carrying its traceback) becomes ``explain``'s DataError, else one with the
    cause's last line."""
    import pyarrow as pa
    from ray.exceptions import RayError

    try:
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    except (RayError, OSError, ValueError, pa.ArrowException) as e:
        raise read_error(e, what, explain) from None


def read_error(e: BaseException, what: str,
               explain: Callable[[BaseException], DataError | None] | None = None
               ) -> DataError:
    """A failed read as the DataError to raise: ``e`` itself when it is one, else
    ``explain``'s, else one with the cause's last line."""
    if isinstance(e, DataError):
        return e
    err = explain(e) if explain is not None else None
    return err or DataError(f"{what}: reading failed: {cause_line(e)}")


def cause_line(e: BaseException) -> str:
    """The last line of an error's message that says what went wrong, ANSI colours removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Invalid)\b", ln):
            return ln[:300]
    return lines[-1][:300] if lines else type(e).__name__
