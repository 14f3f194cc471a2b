"""The unlabeled pool's per-row columns (pseudo-labels, confidences, hidden labels, row ids),
one part per shard, kept where they were made, and a selection over them (issue 13).

A shard worker that fitted the backend returns its rows' labels and confidences as a part;
on Ray the part stays in the object store (the driver holds its reference), and everything
the pipeline does with the pool's columns runs as one small task per part
(:func:`raysl.distributed.tasks.map_parts`): planning a selection (:mod:`raysl.select`: a few
counts per shard), its metrics (:func:`raysl.metrics.shard_summary`, reduced), the backend's
cache and ``pseudo_labels.parquet`` (one file per shard, written where the part is). In this
process (no Ray) the parts are dicts of arrays and the same functions run in a loop. What the
driver holds is O(shards), except where the joint job gathers the kept rows
(:meth:`PoolSelection.kept`).

Columns: ``row`` (the pool row's index in the dataset), ``y`` (its hidden label, -1 unknown),
``label``, ``conf`` (the backend's calibrated argmax label and its probability) and
``label_aligned``, ``conf_aligned`` (the same after alignment to the labeled prior).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from raysl.io import write_npz, write_with
from raysl.metrics import shard_summary, summary_metrics
from raysl.select import NOTHING, Rule, Selection, plan_selection

Columns = dict[str, np.ndarray]
# fn(index, offset, columns, **kwargs): runs on one shard's part
PartFn = Callable[..., Any]


@dataclass(frozen=True, eq=False)
class PoolColumns:
    """Per shard, the objects that together hold its rows' columns: dicts of (n_i,) arrays, or
    Ray ObjectRefs to such dicts (then every function on them runs as a Ray task, where they
    are). Shard i's rows are the pool positions ``offsets[i] .. offsets[i] + sizes[i]``."""

    parts: tuple[tuple[Any, ...], ...]
    sizes: tuple[int, ...]

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0, *self.sizes[:-1])))

    @property
    def remote(self) -> bool:
        return any(not isinstance(o, dict) for part in self.parts for o in part)

    def map(self, fn: PartFn, fetch: bool = True, **kwargs: Any) -> list[Any]:
        """``fn(i, offset, columns, **kwargs)`` for every shard i: in Ray tasks where the
        parts are remote (results fetched, or their refs when not ``fetch``), else here."""
        if self.remote:
            from raysl.distributed.tasks import map_parts

            return map_parts(fn, self.parts, self.offsets, kwargs, fetch)
        return [fn(i, off, merged(part), **kwargs)
                for i, (off, part) in enumerate(zip(self.offsets, self.parts, strict=True))]

    def join(self, objs: Sequence[Any]) -> PoolColumns:
        """These columns and one more object per shard (a dict or a ref to one)."""
        if len(objs) != len(self.parts):
            raise ValueError(f"{len(objs)} objects for {len(self.parts)} shards")
        return replace(self, parts=tuple((*p, o) for p, o in zip(self.parts, objs, strict=True)))

    def gather(self, *names: str) -> tuple[np.ndarray, ...]:
        """Columns ``names`` of the whole pool (n,), in pool order, here: for tests and
        benchmarks on small data, and what the joint job needs of every row."""
        got = self.map(_columns, names=names)
        return tuple(np.concatenate([g[k] for g in got]) for k in range(len(names)))

    def row_columns(self, names: dict[str, str]) -> RowColumns:
        """Columns ``names`` (output -> column) of every row, for the ranks
        (:class:`RowColumns`)."""
        return RowColumns(self.parts, names, None, self.offsets, len(self))

    def save(self, directory: Path) -> None:
        """Each part's columns (but ``row`` and ``y``, the split's) as
        ``directory/part-<i>.npz``, written where the part is."""
        self.map(_save_part, directory=str(directory))

    def load(self, directory: Path) -> PoolColumns:
        """These columns joined with the parts :meth:`save` wrote into ``directory`` (read
        where the parts are used: as Ray tasks when these are remote)."""
        return self.join(self.map(_load_part, fetch=False, directory=str(directory)))


def merged(objs: Sequence[Columns]) -> Columns:
    out: Columns = {}
    for o in objs:
        out.update(o)
    return out


def split_columns(row: np.ndarray, y: np.ndarray, bounds: Sequence[tuple[int, int]],
                  put: Callable[[Columns], Any] | None = None) -> PoolColumns:
    """The split's columns of the pool in its shards ``bounds``: ``row`` and ``y`` (n_u,);
    ``put`` (e.g. ``ray.put``) stores each shard's part where the tasks can read it."""
    parts = [{"row": row[a:b], "y": y[a:b]} for a, b in bounds]
    return PoolColumns(tuple((put(p) if put else p,) for p in parts),
                       tuple(b - a for a, b in bounds))


def _columns(i: int, offset: int, cols: Columns, names: Sequence[str]) -> list[np.ndarray]:
    return [cols[k] for k in names]


_SAVED = ("label", "conf", "label_aligned", "conf_aligned")


def part_path(directory: str | Path, i: int) -> Path:
    return Path(directory) / f"part-{i:05d}.npz"


def _save_part(i: int, offset: int, cols: Columns, directory: str) -> None:
    write_npz(part_path(directory, i), **{k: cols[k] for k in _SAVED})


def _load_part(i: int, offset: int, cols: Columns, directory: str) -> Columns:
    with np.load(part_path(directory, i), allow_pickle=False) as f:
        got = {k: f[k] for k in _SAVED}
    if any(len(v) != len(cols["y"]) for v in got.values()):
        raise ValueError(f"{part_path(directory, i)}: {len(got['label'])} rows, the shard has "
                         f"{len(cols['y'])}")
    return got


# -- a selection over the pool's columns ----------------------------------------------------

@dataclass(frozen=True, eq=False)
class PoolSelection:
    """A :class:`~raysl.select.Rule` over :class:`PoolColumns`; ``aligned``: the rule reads
    ``label_aligned`` and ``conf_aligned``."""

    pool: PoolColumns
    rule: Rule
    aligned: bool = False

    @property
    def names(self) -> tuple[str, str]:
        return _names(self.aligned)

    @classmethod
    def plan(cls, pool: PoolColumns, n_classes: int, criterion: str, threshold: float,
             k_best: int, prior: np.ndarray | None, share: float, aligned: bool
             ) -> PoolSelection:
        """:func:`raysl.select.plan_selection` over the shards' parts."""
        names = _names(aligned)

        def run(fn: Callable[..., np.ndarray], **kw: Any) -> list[np.ndarray]:
            return pool.map(_on_labels, count=fn, names=names, kw=kw)

        return cls(pool, plan_selection(run, len(pool), n_classes, criterion, threshold,
                                        k_best, prior, share), aligned)

    def nothing(self) -> PoolSelection:
        """The same columns with no row kept."""
        return replace(self, rule=NOTHING)

    def summary(self, n_classes: int) -> dict[str, Any]:
        """:func:`raysl.metrics.summary_metrics` of this selection against ``y``."""
        return summary_metrics(self.pool.map(_summary, rule=self.rule, names=self.names,
                                             n_classes=n_classes))

    def kept(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept rows' pool positions (k,) int64 (sorted), labels (k,) int64 and
        confidences (k,) float32, gathered here (what the joint job trains on)."""
        got = self.pool.map(_kept, rule=self.rule, names=self.names)
        return tuple(np.concatenate([g[k] for g in got])
                     for k in range(3))  # type: ignore[return-value]

    def every(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's label (n,) int64 and confidence (n,) float32, gathered here."""
        labels, conf = self.pool.gather(*self.names)
        return labels.astype(np.int64, copy=False), conf.astype(np.float32, copy=False)

    def digest(self) -> str:
        """A hash of every row's label, confidence and whether it is kept (each shard hashes
        its own): the joint job's cache key."""
        h = hashlib.sha256()
        for d in self.pool.map(_digest, rule=self.rule, names=self.names):
            h.update(d.encode())
        return h.hexdigest()

    def gather(self) -> Selection:
        """The selection as arrays over the whole pool (tests, benchmarks: small data)."""
        labels, conf = self.every()
        mask = np.concatenate(self.pool.map(_mask, rule=self.rule, names=self.names))
        return Selection(mask, labels, conf)

    def row_columns(self, names: dict[str, str]) -> RowColumns:
        """The kept rows' columns ``names`` (output -> ``label``/``conf``/...) for the ranks
        (:class:`RowColumns`): each shard counts its kept rows, nothing else comes here."""
        counts = [int(c) for c in self.pool.map(_count, rule=self.rule, names=self.names)]
        return RowColumns(self.pool.parts, names, self.rule,
                          tuple(int(b) for b in np.cumsum([0, *counts[:-1]])), sum(counts),
                          self.names)

    def write_parquet(self, directory: Path, backend: str) -> None:
        """``directory/part-<i>.parquet`` per shard, written where its part is: columns
        ``row``, ``label``, ``confidence``, ``backend``, ``selected``."""
        self.pool.map(_write_parquet, rule=self.rule, names=self.names,
                      directory=str(directory), backend=backend)


# -- columns that travel with the rows to the Ray Train ranks -------------------------------

@dataclass(frozen=True, eq=False)
class RowColumns:
    """Per-row columns of the pool that a rank reads with its share of the rows
    (``raysl.distributed.pool.RemoteRows.rank_datasets``), so the driver never gathers them:
    ``names`` maps each output column to a column of ``parts`` (:class:`PoolColumns`'
    parts); ``rule``: the rows are only those a selection keeps (None: every row), ``before``
    the kept rows in the shards before each, ``n`` all of them."""

    parts: tuple[tuple[Any, ...], ...]
    names: dict[str, str]
    rule: Rule | None
    before: tuple[int, ...]
    n: int
    rule_names: tuple[str, str] = ("label", "conf")  # the columns the rule reads


def share_of(keys: np.ndarray, offset: int, mask: np.ndarray | None, before: int, n: int,
             rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows at pool positions ``keys`` (k,) of a shard that starts at ``offset`` and keeps
    ``mask`` (n_i,) of its rows (None: all), ``before`` rows kept ahead of it, ``n`` in all:
    which of them are in rank ``rank``'s share of the ``n`` (:func:`raysl.data.rank_share`)
    (k,) bool, and their index in that share (k,) int64 (meaningless where not)."""
    local = np.asarray(keys, np.int64) - offset
    if mask is None:
        hit, g = np.ones(len(local), bool), before + local
    else:
        hit, g = mask[local], (before + np.cumsum(mask) - 1)[local]
    if n >= world:
        return hit & (g % world == rank), g // world
    return hit, g


def _names(aligned: bool) -> tuple[str, str]:
    """The label and confidence columns a selection reads."""
    return ("label_aligned", "conf_aligned") if aligned else ("label", "conf")


def _on_labels(i: int, offset: int, cols: Columns, count: Callable[..., Any],
               names: tuple[str, str], kw: dict[str, Any]) -> Any:
    return count(cols[names[0]], cols[names[1]], offset, **kw)


def _mask(i: int, offset: int, cols: Columns, rule: Rule, names: tuple[str, str]
          ) -> np.ndarray:
    return rule.mask(cols[names[0]], cols[names[1]], offset)


def _summary(i: int, offset: int, cols: Columns, rule: Rule, names: tuple[str, str],
             n_classes: int) -> dict[str, np.ndarray]:
    labels, conf = cols[names[0]], cols[names[1]]
    return shard_summary(labels, conf, cols["y"], rule.mask(labels, conf, offset), n_classes)


def _kept(i: int, offset: int, cols: Columns, rule: Rule, names: tuple[str, str]
          ) -> list[np.ndarray]:
    labels, conf = cols[names[0]], cols[names[1]]
    m = rule.mask(labels, conf, offset)
    return [offset + np.flatnonzero(m), labels[m].astype(np.int64),
            conf[m].astype(np.float32)]


def _count(i: int, offset: int, cols: Columns, rule: Rule, names: tuple[str, str]) -> int:
    return int(rule.mask(cols[names[0]], cols[names[1]], offset).sum())


def _digest(i: int, offset: int, cols: Columns, rule: Rule, names: tuple[str, str]) -> str:
    labels, conf = cols[names[0]], cols[names[1]]
    h = hashlib.sha256()
    for a in (labels.astype(np.int64), conf.astype(np.float32),
              rule.mask(labels, conf, offset)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _write_parquet(i: int, offset: int, cols: Columns, rule: Rule, names: tuple[str, str],
                   directory: str, backend: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels, conf = cols[names[0]], cols[names[1]]
    table = pa.table({"row": np.asarray(cols["row"], np.int64),
                      "label": np.asarray(labels, np.int64),
                      "confidence": np.asarray(conf, np.float64),
                      "backend": pa.array([backend] * len(labels), pa.string()),
                      "selected": rule.mask(labels, conf, offset)})
    write_with(Path(directory) / f"part-{i:05d}.parquet", lambda p: pq.write_table(table, p))

__all__ = ["PoolColumns", "PoolSelection", "RowColumns", "merged", "share_of", "split_columns"]
