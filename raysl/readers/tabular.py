"""Tabular data: Parquet or CSV files, one file, a folder of them or a glob, local or any URI
pyarrow reads (``s3://...``).

The label column is ``data.label_column`` (default ``y``); the features are
``data.feature_columns``, or else every other column, which must then all be numeric (a saved
pandas index is not a feature). Labels may be of any kind; null, empty or -1 marks an unlabeled
row (:mod:`raysl.readers.rows`).

The columns are chosen from the first file's schema on the driver, before Ray starts (a missing
label column or a non-numeric feature fails at once, naming the file and the column; which CSV
columns are numeric is read from the first file's first block). Every CSV file and block is
then parsed alike: features as float64, the label as text (typed when collected).

The rows are read by Ray Data through :class:`raysl.readers.datasource.NumberedFiles`, a
:class:`ray.data.datasource.FileBasedDatasource` (Ray's documented extension point for file
formats), rather than ``read_csv`` / ``read_parquet``: those don't tell a row's position in its
file, which the stable ``id`` needs. Hive-style partition folders
(``key=value/``) are read as plain folders (their keys are not columns).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from raysl.config import DataConfig
from raysl.errors import DataError
from raysl.readers.files import Source
from raysl.readers.rows import ROW_ID, collect

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray.data

    from raysl.data import Dataset, Split

logger = logging.getLogger("raysl")

CSV_BLOCK_BYTES = 1 << 20  # pyarrow's default: types are inferred from the first block


def _unreadable(src: Source, path: str, fmt: str, e: BaseException) -> DataError:
    where = src.what if len(src.files) == 1 else f"{src.what}: {path}"
    name = {"parquet": "Parquet", "csv": "CSV"}[fmt]
    return DataError(f"{where}: not a readable {name} file ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160] if str(e) else ''})")


def csv_options() -> dict[str, Any]:
    """pyarrow CSV options shared by the schema check and the read: one thread per reader
    (Ray runs many), and the block size that type inference sees."""
    import pyarrow.csv as pacsv

    return {"read_options": pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES)}


def open_csv_stream(fs: pafs.FileSystem, path: str) -> Any:
    """An input stream on a CSV file, decompressed by the codec its name says (gz, bz2,
    zst)."""
    from pyarrow import Codec

    suffix = path.rsplit(".", 1)[-1].lower()
    codec = {"gz": "gzip", "bz2": "bz2", "zst": "zstd"}.get(suffix)
    if codec is not None and not Codec.is_available(codec):
        codec = None
    return fs.open_input_stream(path, compression=codec)


def file_schema(src: Source, path: str, fmt: str) -> pa.Schema:
    """The schema of one file, read from its footer (Parquet) or first block (CSV)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            with src.fs.open_input_file(path) as f:
                return pq.read_schema(f)
        with open_csv_stream(src.fs, path) as f:
            return pacsv.open_csv(f, **csv_options()).schema
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise _unreadable(src, path, fmt, e) from None


def index_columns(schema: pa.Schema) -> set[str]:
    """Columns holding a saved pandas index (``DataFrame.to_parquet``), or the unnamed first
    column ``DataFrame.to_csv`` writes for it: never features."""
    meta = schema.pandas_metadata or {}
    cols = {c for c in meta.get("index_columns", []) if isinstance(c, str)}
    cols |= {c for c in schema.names if c.startswith("__index_level_")}
    if "" in schema.names:
        cols.add("")
    return cols


def _numeric(t: pa.DataType, fmt: str) -> bool:
    import pyarrow as pa

    # a CSV column empty in the whole first block is typed null: numbers may follow
    return (pa.types.is_integer(t) or pa.types.is_floating(t)
            or (fmt == "csv" and pa.types.is_null(t)))


def choose_columns(src: Source, schema: pa.Schema, fmt: str, cfg: DataConfig
                   ) -> tuple[tuple[str, ...], str]:
    """(feature columns, label column) of ``schema`` for ``cfg``, or a DataError naming the
    file and the column."""
    names = schema.names
    found = f"found {names[:20]}" + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    where = src.what if len(src.files) == 1 else f"{src.what}: {src.files[0]}"
    label = cfg.label_column
    if label not in names:
        raise DataError(f"{where}: no label column {label!r} (set data.label_column); {found}")
    if cfg.feature_columns:
        missing = [c for c in cfg.feature_columns if c not in names]
        if missing:
            raise DataError(f"{where}: data.feature_columns {missing} not found; {found}")
        if label in cfg.feature_columns:
            raise DataError(f"{where}: data.feature_columns includes the label column "
                            f"{label!r}")
        feats = list(cfg.feature_columns)
    else:
        feats = [c for c in names if c != label and c not in index_columns(schema)]
    bad = [c for c in feats if not _numeric(schema.field(c).type, fmt)]
    if bad:
        kinds = ", ".join(f"{c!r} is {schema.field(c).type}" for c in bad[:5])
        hint = ("" if cfg.feature_columns else
                " (choose the features with data.feature_columns), or for text data: no text "
                f"column {cfg.text_column!r} (set data.text_column)")
        raise DataError(f"{where}: feature columns must be numeric; {kinds}{hint}; {found}")
    if not feats:
        raise DataError(f"{where}: no numeric feature column besides the label {label!r}; "
                        f"{found}")
    return tuple(feats), label


@dataclass(frozen=True)
class TabularPlan:
    """What to read, decided on the driver without Ray: :meth:`dataset` makes the Ray
    Dataset, :meth:`read` collects it."""

    src: Source
    fmt: str  # "csv" | "parquet"
    features: tuple[str, ...]
    label: str

    def column_types(self) -> dict[str, Any]:
        """CSV only: features float64, the label as text (typed globally when collected), so
        each block parses alike whatever its first rows hold."""
        import pyarrow as pa

        return {**{c: pa.float64() for c in self.features}, self.label: pa.string()}

    def dataset(self) -> ray.data.Dataset:
        """The rows as a Ray Dataset (columns ``id``, ``x`` float32 ``(d,)``, ``label``). Needs
        a Ray session."""
        import ray.data

        from raysl.readers.datasource import NumberedFiles

        source = NumberedFiles(list(self.src.files), self.src.fs, self.fmt,
                               [*self.features, self.label],
                               self.column_types() if self.fmt == "csv" else None)
        n = read_tasks(len(self.src.files), source.estimate_inmemory_data_size(),
                       int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.read_datasource(source, override_num_blocks=n)
        return ds.map_batches(_to_rows, batch_format="pyarrow",
                              fn_kwargs={"features": list(self.features), "label": self.label})

    def read(self, name: str) -> Dataset:
        return collect(self.dataset(), name, self.src.what, labels=self.fmt)

    def split(self, name: str, cfg: DataConfig) -> Split:
        from raysl.distributed.pool import distribute

        return distribute(self.dataset(), name, self.src.what, cfg, labels=self.fmt)


# a read task takes files until it has about this many bytes of them (tiny files are grouped)
READ_TASK_BYTES = 16 << 20


def read_tasks(n_files: int, size: float | None, cpus: int) -> int:
    """How many Ray Data read tasks for ``n_files`` files of ``size`` bytes in all (None:
    unknown) on a cluster of ``cpus`` CPUs: one per file, fewer when the files are small (a
    task reads :data:`READ_TASK_BYTES` or more), but two per CPU when there are files enough.

    Set rather than left to Ray Data: it asks for 200 blocks, so 10 large files became 10
    read tasks each cutting its output into 20 blocks, and the map after the read ran as 200
    tasks, not fused into the read (bench scale's 700,000 Parquet rows: 17-23 s to read,
    6.7 s with one task per file). One task per file of 600 small files was slower than Ray's
    grouping (8 s against 0.9 s)."""
    by_size = math.ceil(size / READ_TASK_BYTES) if size else n_files
    return max(1, min(n_files, max(2 * cpus, by_size)))


def plan(src: Source, cfg: DataConfig) -> TabularPlan:
    """The tabular read of ``src`` (all its files .parquet or all .csv): columns from the
    first file's schema. Raises DataError for files of other kinds, a text file among several,
    a missing label column or non-numeric features."""
    kinds = src.by_kind()
    tab = {k: v for k, v in kinds.items() if k in ("parquet", "csv")}
    if len(tab) != 1:
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(kinds.items()))
        raise DataError(f"{src.what}: expected .parquet files or .csv files, found {counts}")
    fmt = next(iter(tab))
    others = len(src.files) - len(tab[fmt])
    if others:
        logger.warning("%s: %d files that are not .%s are ignored", src.what, others, fmt)
    src = Source(src.spec, src.fs, tuple(tab[fmt]), src.root)
    schema = file_schema(src, src.files[0], fmt)
    if cfg.text_column in schema.names:
        raise DataError(f"{src.what}: column {cfg.text_column!r} (data.text_column) makes this "
                        f"text data, which is read from one .csv or .parquet file; found "
                        f"{len(src.files)} files")
    features, label = choose_columns(src, schema, fmt, cfg)
    return TabularPlan(src, fmt, features, label)


def _to_rows(batch: pa.Table, features: list[str], label: str) -> pa.Table:
    """A block of the files' columns -> the reader's rows: ``id``, ``x`` (float32 (n, d);
    nulls become NaN, which :func:`raysl.data.load_dataset` reports), ``label`` as stored."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    x = np.stack([batch.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
                  for c in features], axis=1) if batch.num_rows else np.zeros((0, len(features)),
                                                                             np.float32)
    return pa.table({"id": batch.column(ROW_ID), "x": ArrowTensorArray.from_numpy(x),
                     "label": batch.column(label)})


def read(src: Source, cfg: DataConfig) -> Dataset:
    """Read ``src`` as tabular data (:func:`plan`, then Ray Data; needs a Ray session)."""
    return plan(src, cfg).read(src.spec)
