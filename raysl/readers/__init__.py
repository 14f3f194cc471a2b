"""A user's data read where it lives, through Ray Data: tabular files (Parquet, CSV), image
class-folder trees and image manifests; local paths, folders, globs and any URI pyarrow reads
(``s3://...``).

:func:`read` is the one entry point (:func:`raysl.data.load_dataset` calls it): it lists the
files and checks what can be checked without reading them (a missing path, an empty folder, the
label and feature columns, the class folders, the first image's header) on the driver, before
Ray starts; then a reader of :data:`READERS` makes a Ray Dataset (rows ``id``, ``x``, ``label``:
:mod:`raysl.readers.rows`) and collects it into a :class:`raysl.data.Dataset`. A run on Ray
calls the plan's ``split`` instead (:func:`raysl.pipeline.check`): the split is made with the
unlabeled pool and the test set left in the object store (:mod:`raysl.distributed.pool`).

Ray: the read runs in the Ray session already up (a job's, Tune's, the tests', or the run's
own: :func:`raysl.pipeline.run` starts it at ``ray.address`` before the read, after
:func:`plan`); with none, a local Ray is started for the read and stopped after it (joined
through ``RAY_ADDRESS`` when that is set, as :func:`raysl.distributed.session.ensure_ray`
does). That holds with ``ray.enabled=false`` too: reading a user's files always goes
through Ray Data (a few seconds to start Ray), so every path gives the same rows. ``.npz``
files, named datasets and text files are read without Ray by :mod:`raysl.data`. Joined to
a cluster, Ray Data's read tasks may run on any node: local paths must then be on storage
every node sees (or use a URI).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from raysl.config import DataConfig
from raysl.readers.files import Source, find, looks_like_path

if TYPE_CHECKING:
    import ray.data

    from raysl.data import Dataset, Split

logger = logging.getLogger("raysl")


class Plan(Protocol):
    """A read decided on the driver: :meth:`dataset` makes the Ray Dataset (needs Ray),
    :meth:`read` collects it into a :class:`raysl.data.Dataset`, :meth:`split` makes the
    split with the unlabeled pool and test set left in the object store
    (:func:`raysl.distributed.pool.distribute`)."""

    src: Source

    def dataset(self) -> ray.data.Dataset: ...

    def read(self, name: str) -> Dataset: ...

    def split(self, name: str, cfg: DataConfig) -> Split: ...


def _tabular(src: Source, cfg: DataConfig) -> Plan:
    from raysl.readers import tabular

    return tabular.plan(src, cfg)


def _folder(src: Source, cfg: DataConfig) -> Plan:
    from raysl.readers import images

    return images.plan_folder(src, cfg)


def _manifest(src: Source, cfg: DataConfig) -> Plan:
    from raysl.readers import images, tabular

    fmt = "parquet" if src.files[0].lower().endswith(".parquet") else "csv"
    return images.plan_manifest(src, tabular.file_schema(src, src.files[0], fmt), fmt, cfg)


# What a data.dataset can be, by kind (see :func:`kind`). Each makes a Plan without Ray.
READERS: dict[str, Callable[[Source, DataConfig], Plan]] = {
    "tabular": _tabular,
    "images": _folder,
    "manifest": _manifest,
}


def kind(src: Source, cfg: DataConfig) -> str | None:
    """Which reader of :data:`READERS` reads ``src``; None for what :mod:`raysl.data` reads
    itself (an ``.npz``, a text file: one with a ``data.text_column`` column, a file of an
    unknown type). One .csv/.parquet file with a string column ``path`` is a manifest."""
    import pyarrow as pa

    from raysl.readers.files import kind_of
    from raysl.readers.tabular import file_schema

    if src.root is None and len(src.files) == 1:
        fmt = kind_of(src.files[0])
        if fmt not in ("csv", "parquet"):
            return None
        schema = file_schema(src, src.files[0], fmt)
        if cfg.text_column in schema.names:
            return None
        if "path" in schema.names and (pa.types.is_string(schema.field("path").type)
                                       or pa.types.is_large_string(schema.field("path").type)):
            return "manifest"
        return "tabular"
    kinds = {k: len(v) for k, v in src.by_kind().items()}
    if src.root is not None and kinds.get("image", 0) > kinds.get("csv", 0) + kinds.get(
            "parquet", 0):  # a stray plot.png in a folder of tables doesn't make it images
        return "images"
    return "tabular"  # its plan names what it found when that is not .parquet or .csv files


def plan(cfg: DataConfig) -> Plan | None:
    """The read of ``cfg.dataset``, checked on the driver without Ray; None when it is not a
    reader's (a named dataset, an ``.npz``, a text file, a name that is no path)."""
    spec = cfg.dataset
    if spec.endswith(".npz") or not looks_like_path(spec):
        return None
    src = find(spec)
    k = kind(src, cfg)
    return None if k is None else READERS[k](src, cfg)


def read(cfg: DataConfig) -> Dataset | None:
    """``cfg.dataset`` read by a reader into a :class:`raysl.data.Dataset` (x ``(n, d)``
    float32 or ``(n, c, h, w)`` float32 in [0, 1]; y ``(n,)`` int64, -1 unlabeled; the user's
    labels in ``classes``), or None when it is not a reader's (see :func:`plan`). Raises
    DataError for bad input, before Ray starts where the files' listing or headers show it."""
    p = plan(cfg)
    if p is None:
        return None
    with ray_for_reading():
        return p.read(cfg.dataset)


@contextmanager
def ray_for_reading() -> Iterator[None]:
    """A Ray session for a read: the one already up, else one started now and stopped on
    exit (:func:`raysl.distributed.session.ensure_ray`)."""
    import ray

    from raysl.config import RayConfig
    from raysl.distributed import session

    started = session.ensure_ray(RayConfig())
    if started:
        logger.info("raysl: Ray started to read the data (stopped after the read)")
    try:
        yield
    finally:
        if started:
            ray.shutdown()
