"""A user's data split where it was read: the unlabeled pool and the test set stay in Ray's
object store, and the driver holds only what is small (issue 13).

:func:`distribute` takes a reader's Ray Dataset (rows ``id``, ``x``, ``label``:
:mod:`raysl.readers.rows`) and makes the same :class:`raysl.data.Split` as collecting it and
calling :func:`raysl.data.make_split` would, except that ``x_u`` and ``x_test`` are
:class:`RemoteRows`:

1. the blocks are read once into the object store (``Dataset.to_arrow_refs``: on the nodes
   that read them), and one task per block checks its rows and returns its row count and
   distinct labels (with their counts): the driver maps labels to classes from those;
2. the split is a function of each row's id and the seed (:func:`raysl.data.split_keys`), so
   each block's task works out its rows' keys and classes and keeps them where the block is;
   the cuts of :class:`raysl.data.SplitCuts` (per class, the keys below which rows go to the
   test set, validation and labeled; the pool's shard boundaries) come from a radix select
   over those (:func:`raysl.data.plan_split`: 16 rounds of one small histogram per block);
   then per block the test rows' ids and each shard's keys, merged per shard by a task, so
   that rows can be numbered;
3. one task per block routes its rows: the labeled and validation rows come to the driver,
   the test rows and each unlabeled shard's rows stay in the store as parts ``{"key", "x"}``
   (``key``: the row's position in the test set or the pool).

A :class:`RemoteRows` is fetched (:meth:`RemoteRows.fetch`) where it is used: by a shard
actor (its own shard) or an evaluation task (a part of the test set); a Ray Train rank reads
its share of the kept and unlabeled rows as a Ray Dataset
(:meth:`RemoteRows.rank_datasets`, through ``TorchTrainer(datasets=...)`` and
``get_dataset_shard``); never by the driver. The driver keeps the pool's ids and hidden
labels (``split.idx_u``, ``split.y_u``: 16 bytes a row) and the test set's labels, against
784 bytes for a 28x28 image as stored (uint8 pixels stay uint8 in the parts and are made
float32, 3,136 bytes, where they are used).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from raysl.columns import RowColumns, merged, share_of
from raysl.config import DataConfig
from raysl.data import (
    LABELED,
    POOL,
    TEST,
    VAL,
    Split,
    SplitCuts,
    _fingerprint_params,
    encode_labels,
    find_sorted,
    plan_split,
    rank_share,
    shard_bounds,
    split_keys,
)
from raysl.errors import DataError
from raysl.memory import disk_array
from raysl.preprocess import MOMENT_ROWS, Moments, Standardizer
from raysl.readers.rows import label_values, normalize_labels, read_error, tensor_to_numpy

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data
    import torch

logger = logging.getLogger("raysl")

# Routing tasks are light (numpy slicing): a fraction of a CPU each, so a 2-CPU machine runs
# several at once.
TASK_CPUS = 0.25
# "DEFAULT", not left unset: a Tune trial (0.1 CPU) that evaluates a test set in the store
# would otherwise put the tasks in its own placement group, where they can never fit.
TASK_OPTIONS: dict[str, Any] = {"num_cpus": TASK_CPUS, "scheduling_strategy": "DEFAULT"}
_DRIVER, _TEST, _POOL = 0, 1, 2  # destinations: the driver, the test set, shard 0 (then 1, ...)


def assemble(parts: Sequence[dict[str, np.ndarray]], row_shape: tuple[int, ...],
             keep: np.ndarray | None = None,
             transform: Standardizer | None = None, on_disk: bool = False) -> np.ndarray:
    """Parts ``{"key": (k,), "x": (k, ...)}`` -> their rows ``(n, ...)`` float32 in key
    order; ``keep``: only the rows whose key is in it (sorted keys); ``transform``: applied
    last. Pure numpy: what :meth:`RemoteRows.fetch` does with the parts it gets. A part's
    ``x`` is the reader's (e.g. uint8 pixels), made float here as the in-memory reader makes
    it (:func:`_as_float`). Each row is copied once into the result (parts read from the
    object store are not copied first); ``on_disk``: a file-backed result
    (:func:`raysl.memory.disk_array`, rows read in order), not the heap."""
    parts = [p for p in parts if len(p["key"])]
    keys = np.concatenate([p["key"] for p in parts]) if parts else np.zeros(0, np.int64)
    if keep is None:
        dest = np.empty(len(keys), np.int64)
        dest[np.argsort(keys, kind="stable")] = np.arange(len(keys))
        n = len(keys)
    else:
        n = len(keep)
        dest = np.full(len(keys), -1, np.int64)
        at, hit = find_sorted(keep, keys)
        dest[hit] = at[hit]
    out = (disk_array((n, *row_shape), random_access=False) if on_disk
           else np.empty((n, *row_shape), np.float32))
    start = 0
    for p in parts:
        d = dest[start : start + len(p["key"])]
        start += len(p["key"])
        m = d >= 0
        _put_rows(out, d[m], p["x"][m] if not m.all() else p["x"])
    if transform is not None:  # in chunks: no second whole-size temporary
        for a in range(0, n, _CHUNK):
            out[a : a + _CHUNK] = transform(out[a : a + _CHUNK])
    return out


_CHUNK = 65536  # rows transformed at a time
# rows made float at a time: uint8 / 255 goes through float64 (8 bytes a value), so a whole
# part at once would be a transient 8x its stored size
_FLOAT_ROWS = 8192


def _put_rows(out: np.ndarray, at: np.ndarray, x: np.ndarray) -> None:
    """``out[at] = _as_float(x)``: rows ``x`` (k, ...) as stored, made float32 (and given
    ``out``'s row shape: a grey image's channel axis) a block of rows at a time."""
    for a in range(0, len(x), _FLOAT_ROWS):
        out[at[a : a + _FLOAT_ROWS]] = _as_float(x[a : a + _FLOAT_ROWS]).reshape(
            -1, *out.shape[1:])
# concurrent read tasks of a rank's dataset (RemoteRows.rank_datasets): they hold no CPU, so
# this bounds them instead (without it, Ray started tens of idle worker processes)
_READ_TASKS = 2


@dataclass(frozen=True, eq=False)
class RemoteRows:
    """Rows ``(n, *row_shape)`` float32 held in Ray's object store as parts (see
    :func:`assemble`), grouped by shard: ``parts[i]`` are shard i's, whose keys are the pool
    positions ``bounds[i]``. Quacks like the array it stands for where the pipeline needs it:
    ``len``, a boolean mask (``rows[mask]``: the kept rows, in order), ``shards(n)``."""

    parts: tuple[tuple[ray.ObjectRef, ...], ...]
    bounds: tuple[tuple[int, int], ...]  # per shard, its [start, stop) of keys
    row_shape: tuple[int, ...]
    keep: np.ndarray | None = None  # sorted keys of the rows kept (None: all)
    transform: Standardizer | None = None
    # per-row columns read with the rows (and, with a rule, the rows a selection keeps)
    columns: RowColumns | None = None

    def __len__(self) -> int:
        if self.columns is not None and self.columns.rule is not None:
            return self.columns.n
        if self.keep is not None:
            return len(self.keep)
        return sum(b - a for a, b in self.bounds)

    @classmethod
    def put(cls, x: np.ndarray) -> RemoteRows:
        """Rows ``x`` (n, ...) put in the object store as one part (benchmarks, tests)."""
        n = len(x)
        part = ray.put({"key": np.arange(n), "x": np.ascontiguousarray(x, np.float32)})
        return cls(((part,),), ((0, n),), tuple(x.shape[1:]))

    def keys(self) -> np.ndarray:
        """The keys of these rows, in order (n,)."""
        if self.columns is not None and self.columns.rule is not None:
            raise ValueError("the rows a selection keeps are known where they are, not here")
        return self.keep if self.keep is not None else _bound_keys(self.bounds)

    def with_columns(self, columns: RowColumns) -> RemoteRows:
        """These rows (all of them: no mask applied) with ``columns`` read alongside, and
        only the rows its rule keeps when it has one; each rank's dataset then has those
        columns too (:meth:`rank_datasets`). The pool's columns are in the same shards."""
        if self.keep is not None or len(columns.parts) != len(self.parts):
            raise ValueError(f"columns in {len(columns.parts)} shards for rows in "
                             f"{len(self.parts)} shards" if self.keep is None else
                             "columns go with all of the rows, not a mask of them")
        return replace(self, columns=columns)

    def __getitem__(self, mask: np.ndarray) -> RemoteRows:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (len(self),):
            raise TypeError(f"RemoteRows takes a boolean mask of shape ({len(self)},)")
        return replace(self, keep=self.keys()[mask])

    def rank_datasets(self, world: int) -> list[ray.data.Dataset]:
        """For each rank of ``world``, its share of these rows
        (:func:`raysl.data.rank_share`) as a Ray Dataset with columns ``i`` (the row's
        index in the share), ``x`` (float32 rows, transformed) and those of
        :attr:`columns`: one task per stored part, which reads the part where it lives (and
        its shard's columns) and keeps the rank's rows. Lazy: nothing is read until a rank
        iterates its dataset. The driver adds no per-row array to them: the tasks work the
        shares out from the bounds, the kept keys put once, or the selection's rule."""
        import ray.data

        parts = [r for group in self.parts for r in group]
        keep = None if self.keep is None else ray.put(self.keep)  # once for every rank
        out = []
        for rank in range(world):
            ds = ray.data.from_items([{"part": i} for i in range(len(parts))],
                                     override_num_blocks=max(len(parts), 1))
            out.append(ds.map_batches(
                _part_rows, batch_size=1, num_cpus=0, zero_copy_batch=True,
                compute=ray.data.TaskPoolStrategy(size=max(1, min(_READ_TASKS, len(parts)))),
                fn_kwargs=self._read_args(rank, world, keep)))
        return out

    def _read_args(self, rank: int, world: int, keep: ray.ObjectRef | None
                   ) -> dict[str, Any]:
        """:func:`_part_rows`' arguments for rank ``rank`` of ``world``; ``keep``: the kept
        keys, put in the object store."""
        return {"parts": [r for group in self.parts for r in group],
                "shard_of": [i for i, group in enumerate(self.parts) for _ in group],
                "bounds": self.bounds, "keep": keep,
                "rank": rank, "world": world, "transform": self.transform,
                "row_shape": self.row_shape, "columns": self.columns}

    def shards(self, n: int) -> list[RemoteRows]:
        """The ``n`` shards the rows were routed to (``n`` must be that number)."""
        if n != len(self.parts) or self.keep is not None:
            raise ValueError(f"these rows were routed to {len(self.parts)} shards; asked for {n}")
        return [RemoteRows((p,), (b,), self.row_shape, None, self.transform)
                for p, b in zip(self.parts, self.bounds, strict=True)]

    def with_transform(self, transform: Standardizer) -> RemoteRows:
        return replace(self, transform=transform)

    def fetch(self, on_disk: bool = False) -> np.ndarray:
        """The rows as one array ``(n, *row_shape)``, read from the store (where it runs);
        ``on_disk``: file-backed (:func:`assemble`)."""
        if self.columns is not None:  # the rows as one rank of one reads them
            return self.fetch_columns(on_disk)["x"]
        parts = ray.get([r for group in self.parts for r in group])
        return assemble(parts, self.row_shape, self.keep, self.transform, on_disk)

    def fetch_columns(self, on_disk: bool = False) -> dict[str, np.ndarray]:
        """The rows (``x``) and :attr:`columns`, each one array in order, read here."""
        args = self._read_args(0, 1, None)  # with columns there are no kept keys
        batches = (_part_rows({"part": np.array([i])}, **args) for i in range(len(args["parts"])))
        return share_from_batches(batches, len(self), self.row_shape, on_disk,
                                  list(self.columns.names) if self.columns else [])

    def blocks(self, rows: int | None = None) -> Iterator[np.ndarray]:
        """The rows in order, ``rows`` at a time (the last block shorter): float32
        ``(k, *row_shape)``, transformed; the slices of :meth:`fetch`'s array, bit for bit,
        with one block's copy held at a time (the parts are read from the object store
        without a copy). Runs where the rows are used (a task), like :meth:`fetch`.
        ``rows``: by default :data:`raysl.preprocess.MOMENT_ROWS`."""
        rows = rows or MOMENT_ROWS
        parts = [p for p in ray.get([r for group in self.parts for r in group])
                 if len(p["key"])]
        keys = np.concatenate([p["key"] for p in parts]) if parts else np.zeros(0, np.int64)
        part = np.repeat(np.arange(len(parts)), [len(p["key"]) for p in parts])
        row = np.concatenate([np.arange(len(p["key"])) for p in parts] or [part])
        if self.keep is not None:
            hit = find_sorted(self.keep, keys)[1]
            keys, part, row = keys[hit], part[hit], row[hit]
        order = np.argsort(keys, kind="stable")
        for a in range(0, len(order), rows):
            o = order[a : a + rows]
            out = np.empty((len(o), *self.row_shape), np.float32)
            for i in np.unique(part[o]):
                m = part[o] == i
                _put_rows(out, np.flatnonzero(m), parts[i]["x"][row[o][m]])
            yield out if self.transform is None else self.transform(out)

    def moments(self) -> list[Moments]:
        """Each shard's :class:`~raysl.preprocess.Moments`, computed by a task per shard: what
        ``Moments.of`` of each shard's fetched rows gives, without fetching them here."""
        return ray.get([_moments.options(**TASK_OPTIONS).remote(s) for s in
                        self.shards(len(self.parts))])

    def predict(self, model_state: dict[str, Any], build: Callable[[], torch.nn.Module]
                ) -> np.ndarray:
        """The class predicted for every row ``(n,)`` by the model ``build()`` with
        ``model_state`` loaded, one task per shard."""
        state = ray.put(model_state)
        preds = ray.get([_predict.options(**TASK_OPTIONS).remote(s, state, build)
                         for s in self.shards(len(self.parts))])
        return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def _bound_keys(bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The keys ``[a, b)`` of every shard's bounds, in order (n,)."""
    return np.concatenate([np.arange(a, b) for a, b in bounds] or [np.zeros(0, np.int64)])


def _part_rows(batch: dict[str, np.ndarray], parts: list[ray.ObjectRef], shard_of: list[int],
               bounds: tuple[tuple[int, int], ...], keep: ray.ObjectRef | None, rank: int,
               world: int, transform: Standardizer | None, row_shape: tuple[int, ...],
               columns: RowColumns | None = None) -> dict[str, np.ndarray]:
    """:meth:`RemoteRows.rank_datasets`' read: the rows of part ``batch["part"][0]`` in rank
    ``rank``'s share, as ``{"i": their indices in the share, "x": the rows}`` and the
    columns of ``columns`` (read from the part's shard's columns, where they are)."""
    p = int(batch["part"][0])
    part = ray.get(parts[p])
    extra: dict[str, np.ndarray] = {}
    if columns is not None:
        s = shard_of[p]
        cols = merged([ray.get(o) if isinstance(o, ray.ObjectRef) else o
                       for o in columns.parts[s]])
        mask = (None if columns.rule is None else columns.rule.mask(
            cols[columns.rule_names[0]], cols[columns.rule_names[1]], bounds[s][0]))
        hit, at = share_of(part["key"], bounds[s][0], mask, columns.before[s], columns.n,
                           rank, world)
        local = part["key"][hit] - bounds[s][0]
        extra = {out: np.asarray(cols[name])[local] for out, name in columns.names.items()}
        at = at[hit]
    else:
        keys = np.asarray(ray.get(keep)) if keep is not None else _bound_keys(bounds)
        want = keys[rank_share(len(keys), rank, world)]
        at, hit = find_sorted(want, part["key"])
        at = at[hit]
    x = np.empty((int(hit.sum()), *row_shape), np.float32)
    _put_rows(x, np.arange(len(x)), part["x"][hit])
    if transform is not None:
        x = np.asarray(transform(x), np.float32)
    return {"i": at, "x": x, **extra}


def share_from_batches(batches: Iterable[dict[str, np.ndarray]], n: int,
                       row_shape: tuple[int, ...], on_disk: bool = False,
                       columns: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The ``n`` rows ``x`` ``(n, *row_shape)`` float32 of the batches of a dataset of
    :meth:`RemoteRows.rank_datasets`, each put at its index, and the batches' other columns
    (n,) likewise (``columns``: those expected, there even when no batch came); an error when
    any row is missing (a short read). ``on_disk``: the rows in a file-backed array
    (:func:`raysl.memory.disk_array`), not on the heap."""
    out = {"x": disk_array((n, *row_shape)) if on_disk
           else np.empty((n, *row_shape), np.float32)}
    seen = np.zeros(n, bool)
    for b in batches:
        i = np.asarray(b["i"], np.int64)
        for k, v in b.items():
            if k == "i":
                continue
            if k not in out:
                out[k] = np.empty(n, np.asarray(v).dtype)
            out[k][i] = v
        seen[i] = True
    if not seen.all():
        raise RuntimeError(f"read {int(seen.sum())} of {n} rows from the dataset shard")
    for k in columns:  # no rows, so no batch said its type
        out.setdefault(k, np.zeros(0))
    return out


# The tasks below read their shard a block of rows at a time: their memory does not grow with
# the shard (whole, a 346,485-row shard of 784 columns peaked at 4.35 GB of heap).

@ray.remote
def _moments(rows: RemoteRows) -> Moments:
    # the blocks of Moments.of(rows.fetch())
    return Moments.of_blocks(rows.blocks(), int(np.prod(rows.row_shape)))


@ray.remote
def _predict(rows: RemoteRows, state: dict[str, Any], build: Callable[[], Any]) -> np.ndarray:
    import torch

    from raysl.train import predict_proba, state_from_numpy

    torch.set_num_threads(1)
    model = build()
    model.load_state_dict(state_from_numpy(state))
    # blocks of a multiple of predict_proba's batch: the same batches as over the whole
    preds = [predict_proba(model, b).argmax(1) for b in rows.blocks()]
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


# -- reading and routing ----------------------------------------------------------------------

@ray.remote
def _survey(table: pa.Table, check: Callable[[pa.Table], None] | None) -> dict[str, Any]:
    """One block's row count, smallest id, label values (as stored) and their counts, row
    shape and dtype, digest and non-finite rows' ids: nothing per row but those few. A
    DataError of ``check`` comes back as its message (not a task failure's traceback)."""
    ids = table.column("id").to_numpy()
    x = tensor_to_numpy(table.column("x"))
    values, counts = _value_counts(label_values(table.column("label")))
    out: dict[str, Any] = {"n": len(ids), "min_id": int(ids.min()) if len(ids) else 0,
                           "values": values, "counts": counts, "error": None}
    if check is not None:
        try:
            check(table)
        except DataError as e:
            out["error"] = str(e)
    out["shape"], out["dtype"] = tuple(x.shape[1:]), str(x.dtype)
    out["digest"] = block_digest(ids, x)
    flat = x.reshape(len(x), -1)
    out["nonfinite"] = ids[~np.isfinite(flat).all(axis=1)] if x.dtype.kind == "f" else ids[:0]
    return out


def _value_counts(values: np.ndarray, weights: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a label column (k,) and how often each occurs (k,), each
    value counting ``weights`` times (default once: the blocks' counts, merged); values that
    can't be ordered (mixed types) come back as they are, for
    :func:`raysl.data.encode_labels` to name."""
    w = np.ones(len(values), np.int64) if weights is None else np.asarray(weights, np.int64)
    try:
        uniq, inverse = np.unique(values, return_inverse=True)
    except TypeError:
        return values, w
    return uniq, np.bincount(inverse.reshape(-1), w, len(uniq)).astype(np.int64)


def block_digest(ids: np.ndarray, x: np.ndarray) -> str:
    """SHA-256 of a block's ids ``(n,)`` and rows ``(n, ...)`` in id order: the same for the
    same rows in any order. A file's block is in order already (no reordered copy), and the
    arrays' buffers are hashed where they are (no ``tobytes()`` copy)."""
    if not (ids[1:] >= ids[:-1]).all():
        order = np.argsort(ids, kind="stable")
        ids, x = ids[order], x[order]
    h = hashlib.sha256(_buffer(ids))
    h.update(_buffer(x))
    return h.hexdigest()


def _buffer(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes in C order (as ``a.tobytes()``), without a copy when it is contiguous."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _as_float(x: np.ndarray) -> np.ndarray:
    """The reader's x as :func:`raysl.data._from_arrays` makes it: uint8 / 255, float32,
    grey images ``(n, h, w)`` as ``(n, 1, h, w)``."""
    if x.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 3:
        x = x[:, None]
    return np.asarray(x, np.float32)


def label_codes(values: np.ndarray, uniq: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each stored label ``values`` (n,) as its class code (n,) int64 (-1 unlabeled), from
    the dataset's distinct stored labels ``uniq`` (k,) (sorted, as ``np.unique`` gives them)
    and their codes (k,)."""
    if values.dtype.kind in "biufU" and uniq.dtype.kind in "biufU":
        at = np.searchsorted(uniq, values)  # NaN sorts last in both
        return codes[np.minimum(at, len(uniq) - 1)]
    index = dict(zip(uniq.tolist(), codes.tolist(), strict=True))
    return np.array([index[v] for v in values.tolist()], np.int64)


@ray.remote
def _keys(table: pa.Table, lookup: tuple[np.ndarray, np.ndarray], seed: int
          ) -> dict[str, np.ndarray]:
    """One block's rows' ids, split keys (:func:`raysl.data.split_keys`) and class codes,
    (n,) each: what the split's planning reads, 24 bytes a row, kept where the block is."""
    ids = table.column("id").to_numpy()
    return {"id": ids, "key": split_keys(ids, seed),
            "code": label_codes(label_values(table.column("label")), *lookup)}


@ray.remote
def _on_keys(fn: Callable[..., Any], kc: dict[str, np.ndarray], kw: dict[str, Any]) -> Any:
    return fn(kc["key"], kc["code"], **kw)


def _index(kc: dict[str, np.ndarray], cuts: SplitCuts) -> list[dict[str, np.ndarray]]:
    """One block's contribution to the positions: its test rows' ids (sorted) and each
    shard's rows (by key): ``[test, shard 0, shard 1, ...]``, each ``{"order", "id",
    "code"}``, ``order`` sorted (ids for the test set, keys in a shard)."""
    part = cuts.part(kc["key"], kc["code"])
    out = []
    test = np.flatnonzero(part == TEST)
    test = test[np.argsort(kc["id"][test])]
    out.append({"order": kc["id"][test], "id": kc["id"][test], "code": kc["code"][test]})
    pool = np.flatnonzero(part == POOL)
    shard = cuts.shard(kc["key"][pool])
    for s in range(len(cuts.shard_cut) + 1):
        rows = pool[shard == s]
        rows = rows[np.argsort(kc["key"][rows])]
        out.append({"order": kc["key"][rows], "id": kc["id"][rows], "code": kc["code"][rows]})
    return out


@ray.remote(num_returns=2)
def _merge(*pieces: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every block's rows of one group (the test set, or one shard) in order: their sorted
    ``order`` (n,) (how route tasks number the rows), and their ids and codes (n,) in that
    order (what the driver keeps of the pool: its ids and hidden labels)."""
    order = np.concatenate([p["order"] for p in pieces])
    o = np.argsort(order, kind="stable")
    return order[o], {k: np.concatenate([p[k] for p in pieces])[o] for k in ("id", "code")}


def _route(table: pa.Table, kc: dict[str, np.ndarray], cuts: SplitCuts,
           starts: list[int], *orders: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One block's rows by destination: the labeled rows, the validation rows (keyed by id,
    with their codes ``y``), the test set, pool shard 0, 1, ... (keyed by their position:
    in the test set's ids ``orders[0]``, or ``starts[s]`` + the rank in shard s's keys
    ``orders[1 + s]``), some possibly empty."""
    part = cuts.part(kc["key"], kc["code"])
    # uint8 pixels stay uint8 (a quarter of float32's bytes in the store) and are made float
    # where the rows are used (assemble, _part_rows); wider types are made float32 here
    x = tensor_to_numpy(table.column("x"))
    if x.dtype != np.uint8:
        x = _as_float(x)
    out = []
    for p in (LABELED, VAL):
        m = part == p
        out.append({"key": kc["id"][m], "x": x[m], "y": kc["code"][m]})
    m = part == TEST
    out.append({"key": np.searchsorted(orders[0], kc["id"][m]), "x": x[m]})
    pool = np.flatnonzero(part == POOL)
    shard = cuts.shard(kc["key"][pool])
    for s in range(len(starts)):
        rows = pool[shard == s]
        out.append({"key": starts[s] + np.searchsorted(orders[1 + s], kc["key"][rows]),
                    "x": x[rows]})
    return out


_LAB, _VAL, _TEST, _POOL = 0, 1, 2, 3  # route's destinations: then shard 0, 1, ...


def distribute(ds: ray.data.Dataset, name: str, what: str, cfg: DataConfig, *,
               check: Callable[[pa.Table], None] | None = None,
               explain: Callable[[BaseException], DataError | None] | None = None,
               labels: str = "parquet") -> Split:
    """A reader's dataset ``ds`` split with its pool and test set left in the object store
    (see the module's docstring). The same rows as ``make_split(collect(ds, ...), cfg)``
    (:func:`raysl.readers.rows.collect`; ``check``, ``explain``, ``labels`` as there), in the
    same order; ``split.key`` differs (it hashes the blocks). Needs a Ray session."""
    # 1. read into the store; one survey task per block
    blocks = _read_blocks(ds, what, explain)
    surveys = ray.get([_survey.options(**TASK_OPTIONS).remote(b, check) for b in blocks])
    for s in surveys:
        if s["error"]:
            raise DataError(s["error"])
    surveys = [s for s in surveys if s["n"]]
    if not surveys:
        raise DataError(f"{what}: no rows")
    shapes = {(s["shape"], s["dtype"]) for s in surveys}
    if len(shapes) > 1:
        raise DataError(f"{what}: blocks of different row shapes {sorted(shapes)}")
    (row_shape, dtype), = shapes
    n = sum(s["n"] for s in surveys)
    x_shape = _as_float(np.zeros((0, *row_shape), dtype)).shape[1:]
    _check_rows(name, n, row_shape, dtype)
    # the classes, from the distinct stored labels: each block maps its own rows to codes
    uniq, counts = _value_counts(np.concatenate([s["values"] for s in surveys]),
                                 np.concatenate([s["counts"] for s in surveys]))
    codes, classes = encode_labels(normalize_labels(uniq, labels), f"{name}: y")
    if (codes >= 0).sum() == 0:
        raise DataError(f"{name}: y has no labeled rows (all are unlabeled: -1, empty or null)")
    plain = (np.issubdtype(classes.dtype, np.integer)
             and np.array_equal(classes, np.arange(len(classes))))
    per_class = np.bincount(codes[codes >= 0], counts[codes >= 0], len(classes)).astype(np.int64)
    lookup = ray.put((uniq, codes))
    kc = [_keys.options(**TASK_OPTIONS).remote(b, lookup, cfg.seed) for b in blocks]
    bad = np.concatenate([s["nonfinite"] for s in surveys])
    if len(bad):
        _nonfinite(name, bad, kc)

    # 2. the split: cuts found by a radix select over the blocks' keys
    def run(fn: Callable[..., Any], **kw: Any) -> list[Any]:
        return ray.get([_on_keys.options(**TASK_OPTIONS).remote(fn, r, kw) for r in kc])

    cuts = plan_split(run, per_class, bool((codes < 0).any()), n, cfg)
    n_groups = 1 + cfg.n_shards  # the test set, then each shard
    index = ray.remote(num_returns=n_groups, **TASK_OPTIONS)(_index)
    pieces = [index.remote(r, cuts) for r in kc]
    merged = [_merge.options(**TASK_OPTIONS).remote(*[p[g] for p in pieces])
              for g in range(n_groups)]
    del pieces
    orders = [m[0] for m in merged]
    meta = ray.get([m[1] for m in merged])  # the test set's and the pool's ids and codes
    bounds = shard_bounds(cuts.n_pool, cfg.n_shards)

    # 3. route every block's rows
    n_out = _POOL + cfg.n_shards
    route = ray.remote(num_returns=n_out, **TASK_OPTIONS)(_route)
    starts = [a for a, _ in bounds]
    routed = [route.remote(b, r, cuts, starts, *orders) for b, r in zip(blocks, kc, strict=True)]
    del blocks  # the read blocks are freed once routed
    kc.clear()
    mine = [ray.get([r[d] for r in routed]) for d in (_LAB, _VAL)]
    (x_l, y_l, idx_l), (x_v, y_v, _) = (_driver_rows(p, x_shape) for p in mine)
    test = RemoteRows((tuple(r[_TEST] for r in routed),), ((0, len(meta[0]["id"])),), x_shape)
    pool = RemoteRows(tuple(tuple(r[_POOL + i] for r in routed) for i in range(cfg.n_shards)),
                      tuple(bounds), x_shape)
    idx_u = np.concatenate([m["id"] for m in meta[1:]])
    y_u = np.concatenate([m["code"] for m in meta[1:]])
    digest = hashlib.sha256()
    for s in sorted(surveys, key=lambda s: s["min_id"]):
        digest.update(s["digest"].encode())
    digest.update(_fingerprint_params(cfg).encode())
    logger.info("[data] %s: %d rows in %d blocks; %d labeled + %d validation rows on the "
                "driver, %d unlabeled and %d test rows left in the object store", what, n,
                len(surveys), len(idx_l), len(y_v), len(idx_u), len(meta[0]["id"]))
    return Split(x_l=x_l, y_l=y_l, x_u=pool, y_u=y_u,  # type: ignore[arg-type]
                 x_val=x_v, y_val=y_v, x_test=test,  # type: ignore[arg-type]
                 y_test=meta[0]["code"], idx_l=idx_l, idx_u=idx_u, n_classes=len(classes),
                 key=digest.hexdigest()[:16], classes=None if plain else classes)


def _driver_rows(parts: list[dict[str, np.ndarray]], x_shape: tuple[int, ...]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labeled or validation rows routed to the driver, in id order: ``(x, y, ids)``."""
    ids = np.concatenate([p["key"] for p in parts])
    y = np.concatenate([p["y"] for p in parts])
    order = np.argsort(ids, kind="stable")
    return assemble(parts, x_shape), y[order], ids[order]


@ray.remote
def _below(kc: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """How many of a block's rows have a smaller id than each of ``ids`` (k,)."""
    return np.searchsorted(np.sort(kc["id"]), ids)


def _read_blocks(ds: ray.data.Dataset, what: str,
                 explain: Callable[[BaseException], DataError | None] | None
                 ) -> list[ray.ObjectRef]:
    """``ds``'s blocks as pyarrow tables in the object store (on the nodes that read them);
    a failed read becomes a DataError as :func:`raysl.readers.rows.iterate` makes it."""
    import pyarrow as pa
    from ray.exceptions import RayError

    try:
        return ds.to_arrow_refs()
    except (RayError, OSError, ValueError, pa.ArrowException) as e:
        raise read_error(e, what, explain) from None


def _check_rows(name: str, n: int, row_shape: tuple[int, ...], dtype: str) -> None:
    """What :func:`raysl.data._from_arrays` and ``load_dataset`` check of collected rows'
    type and shape."""
    if np.dtype(dtype).kind not in "biuf":
        raise DataError(f"{name}: x has dtype {dtype}; features must be numbers (int, uint "
                        "or float)")
    if len(row_shape) not in (1, 2, 3):
        raise DataError(f"{name}: x has shape {(n, *row_shape)}; expected (n, d), (n, h, w) "
                        "or (n, c, h, w)")


def _nonfinite(name: str, bad: np.ndarray, kc: list[ray.ObjectRef]) -> None:
    """The error for rows with NaN/inf (ids ``bad``), naming them by position in id order as
    the collected rows' check does: each block counts its rows below them."""
    bad = np.sort(bad)
    rows = np.sum(ray.get([_below.options(**TASK_OPTIONS).remote(r, bad) for r in kc]), axis=0)
    raise DataError(f"{name}: x has NaN/inf values in {len(rows)} rows "
                    f"(first: {rows[:5].tolist()}); features must be finite")


__all__ = ["RemoteRows", "assemble", "distribute", "share_from_batches"]
