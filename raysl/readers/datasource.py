"""The Ray Data datasource of the tabular reader. Importing this module imports Ray Data (only
:meth:`raysl.readers.tabular.TabularPlan.dataset` does, with a Ray session up)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.data.datasource import FileBasedDatasource

from raysl.readers.rows import ID_STRIDE, ROW_ID
from raysl.readers.tabular import csv_options

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


BLOCK_BYTES = 64 << 20  # a Parquet read's batches, as float32 features


class NumberedFiles(FileBasedDatasource):
    """CSV or Parquet files, each row with an int64 ``_raysl_row_id``: its file's rank in
    ``files`` (sorted) × 2^32 + its position in the file. Only ``columns`` are read; CSV columns
    get ``column_types``.

    Ray Data's documented extension point for file formats (``_read_stream`` yields a file's
    blocks; Ray lists, schedules and retries): a file is read whole, in order, by one read
    task, so the position of each row is known there and nowhere else."""

    def __init__(self, files: list[str], fs: pafs.FileSystem, fmt: str, columns: list[str],
                 column_types: dict[str, pa.DataType] | None = None) -> None:
        import ray

        super().__init__(files, filesystem=fs)
        self._fmt = fmt
        self._columns = columns
        self._column_types = column_types
        # file -> rank, through the object store once: read tasks carry the datasource itself
        self._ranks_ref = ray.put({p: i for i, p in enumerate(files)})
        self._ranks: dict[str, int] | None = None

    def get_name(self) -> str:
        return f"Numbered{self._fmt.capitalize()}"

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        if self._fmt == "parquet":  # Parquet needs random access (the footer comes first)
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _tables(self, f: Any) -> Iterator[pa.Table]:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if self._fmt == "parquet":
            # batches of about BLOCK_BYTES once made float32: pyarrow's 65,536-row default of a
            # wide table (10,000 float64 columns: 5 GB) would be read whole into the task
            # before Ray Data cuts its blocks (at 128 MB)
            rows = max(1024, BLOCK_BYTES // (4 * len(self._columns)))
            for b in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=self._columns):
                yield pa.Table.from_batches([b])
            return
        convert = pacsv.ConvertOptions(include_columns=self._columns,
                                       column_types=self._column_types)
        for b in pacsv.open_csv(f, **csv_options(), convert_options=convert):
            yield pa.Table.from_batches([b])

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        import pyarrow as pa
        import ray

        if self._ranks is None:
            self._ranks = ray.get(self._ranks_ref)
        start = self._ranks[path] * ID_STRIDE
        for table in self._tables(f):
            if table.num_rows:
                ids = np.arange(start, start + table.num_rows, dtype=np.int64)
                yield table.append_column(ROW_ID, pa.array(ids))
                start += table.num_rows
