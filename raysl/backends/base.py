"""The backend contract and the round-based fit loop shared by the local and Ray executors.

A backend is fitted in rounds. Each round, every shard worker loads the driver's current state,
computes ``shard_stats`` on its shard (pure: no mutation), and the driver folds the list of
statistics into new parameters with ``merge``. For the GMM the statistics are sufficient
statistics (exact, whatever the sharding); for neural backends they are locally trained weights
averaged by shard size (FedAvg). At the end each worker predicts its own shard: all of its
probabilities (:meth:`ShardWorker.predict`, for benchmarks), or what the pipeline keeps of them
(:meth:`ShardWorker.label`: each row's label and confidence, which stay with the worker's
results as :mod:`raysl.columns` parts; so do the probabilities).

Where the shards live is the executor's business: :class:`LocalExecutor` here (a list), and
``raysl.distributed.actors.RayExecutor`` (one Ray actor per shard). Both drive the same
:class:`ShardWorker`, so their results are identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from raysl.calibration import apply_temperature
from raysl.data import materialize
from raysl.metrics import ece_bins
from raysl.select import align_to_prior


@dataclass(frozen=True)
class FitContext:
    """What every backend may know besides its own config: the problem's shape and seed, and
    the initial classifier trained on the labeled rows (its state dict), for ``self``."""

    n_classes: int
    input_shape: tuple[int, ...]
    seed: int
    hidden: int = 256
    classifier_state: dict[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class Shard:
    """One worker's data: its unlabeled rows and the (small, replicated) labeled set."""

    x_u: np.ndarray  # (n_i, ...)
    x_l: np.ndarray  # (n_l, ...)
    y_l: np.ndarray  # (n_l,)
    index: int = 0


class Backend(Protocol):
    """A pseudo-label backend. Shapes: ``x`` is ``(n, ...)``; probabilities are ``(n, C)``."""

    def init(self, x_l: np.ndarray, y_l: np.ndarray) -> None:
        """Driver side: set the initial parameters from the labeled rows."""

    @property
    def converged(self) -> bool:
        """True when no further round is needed."""

    def shard_stats(self, shard: Shard) -> Any:
        """Worker side: statistics of one shard under the current parameters (pure)."""

    def merge(self, stats: Sequence[Any]) -> float:
        """Driver side: update the parameters from all shards' statistics; return the
        objective evaluated at the parameters the statistics were computed with."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, C)`` for rows ``x`` ``(n, ...)``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


BackendFactory = Callable[[Any, FitContext], Backend]


@dataclass(frozen=True)
class LabelCall:
    """What :meth:`ShardWorker.label` predicts with: the fitted backend ``state``, the
    calibration (``temperature`` applied with ``floor`` under log p, raysl.calibration) and a
    ``token`` naming the call (:meth:`ShardWorker.aligned` reuses its probabilities)."""

    state: dict[str, Any]
    temperature: float
    floor: float
    token: str


@dataclass(frozen=True)
class ShardLabels:
    """What the driver fetches of one shard's probabilities (n_i, C) after calibration (the
    rows' labels and confidences stay with the shard: :meth:`ShardWorker.label`): ``psum``
    (C,) their column sums (float64: the pool's mean prediction, for alignment) and
    ``ece_bins_raw`` the uncalibrated probabilities' ECE bins against the hidden labels
    (:func:`raysl.metrics.ece_bins`)."""

    psum: np.ndarray
    ece_bins_raw: np.ndarray


class ShardWorker:
    """Holds one shard and a backend instance; stateless between calls (the state comes with
    every call), so a restarted Ray actor or a retried call gives the same answer."""

    def __init__(self, factory: BackendFactory, backend_cfg: Any, ctx: FitContext,
                 shard: Shard) -> None:
        self.backend = factory(backend_cfg, ctx)
        # a shard left in Ray's object store (raysl.distributed.pool) is fetched here: by the
        # shard's actor, not the driver
        self.shard = replace(shard, x_u=materialize(shard.x_u))
        # the last label() call's token and calibrated probabilities, for aligned(): a cache,
        # not state (a restarted worker predicts them again)
        self._last: tuple[str, np.ndarray] | None = None

    def stats(self, state: dict[str, Any]) -> Any:
        self.backend.load_state_dict(state)
        return self.backend.shard_stats(self.shard)

    def predict(self, state: dict[str, Any]) -> np.ndarray:
        """The shard's probabilities (n_i, C) as float32: the driver gathers one row per
        pool row, and float64's extra digits change no label and no threshold decision that
        matters (they are calibrated, thresholded and stored as confidences)."""
        self.backend.load_state_dict(state)
        return np.asarray(self.backend.predict_proba(self.shard.x_u), np.float32)

    def _calibrated(self, call: LabelCall) -> np.ndarray:
        if self._last is not None and self._last[0] == call.token:
            return self._last[1]
        proba = self.predict(call.state)
        return apply_temperature(proba, call.temperature, out=proba, floor=call.floor)

    def label(self, call: LabelCall, y: np.ndarray) -> tuple[ShardLabels, dict[str, np.ndarray]]:
        """The shard's :class:`ShardLabels` and its rows' columns (:mod:`raysl.columns`):
        ``label`` (n_i,) int64, the calibrated argmax, and ``conf`` (n_i,) float32, its
        probability; ``y`` (n_i,) its hidden labels (-1: unknown)."""
        proba = self.predict(call.state)
        raw = ece_bins(proba.max(1), proba.argmax(1), y)
        proba = apply_temperature(proba, call.temperature, out=proba, floor=call.floor)
        self._last = (call.token, proba)
        return (ShardLabels(proba.sum(0, dtype=np.float64), raw),
                {"label": proba.argmax(1).astype(np.int64), "conf": proba.max(1)})

    def aligned(self, call: LabelCall, p_model: np.ndarray, prior: np.ndarray
                ) -> dict[str, np.ndarray]:
        """Columns ``label_aligned`` and ``conf_aligned`` (n_i,): the labels and confidences
        of the calibrated probabilities aligned to ``prior`` (C,) from the pool's mean
        prediction ``p_model`` (C,) (:func:`raysl.select.align_to_prior`). Drops the
        probabilities kept since :meth:`label`."""
        proba = self._calibrated(call)
        self._last = None
        q = align_to_prior(proba, prior, p_model)
        return {"label_aligned": q.argmax(1).astype(np.int64),
                "conf_aligned": q.max(1).astype(np.float32)}


class Executor(Protocol):
    def stats(self, state: dict[str, Any]) -> list[Any]: ...

    def predict(self, state: dict[str, Any]) -> list[np.ndarray]: ...

    def label(self, call: LabelCall, ys: Sequence[np.ndarray]
              ) -> list[tuple[ShardLabels, Any]]:
        """Per shard, :meth:`ShardWorker.label`: its summary, and its columns (a dict, or a
        reference to it where the worker is)."""
        ...

    def aligned(self, call: LabelCall, p_model: np.ndarray, prior: np.ndarray
                ) -> list[Any]:
        """Per shard, :meth:`ShardWorker.aligned`'s columns (or a reference to them)."""
        ...

    def memory(self) -> list[dict[str, Any]]:
        """Per worker process: its rows, whether it keeps them on disk, its memory."""
        ...


class LocalExecutor:
    """Runs the shard workers one after another in this process."""

    def __init__(self, workers: Sequence[ShardWorker]) -> None:
        self.workers = list(workers)

    def stats(self, state: dict[str, Any]) -> list[Any]:
        return [w.stats(state) for w in self.workers]

    def predict(self, state: dict[str, Any]) -> list[np.ndarray]:
        return [w.predict(state) for w in self.workers]

    def label(self, call: LabelCall, ys: Sequence[np.ndarray]
              ) -> list[tuple[ShardLabels, Any]]:
        return [w.label(call, y) for w, y in zip(self.workers, ys, strict=True)]

    def aligned(self, call: LabelCall, p_model: np.ndarray, prior: np.ndarray
                ) -> list[Any]:
        return [w.aligned(call, p_model, prior) for w in self.workers]

    def memory(self) -> list[dict[str, Any]]:
        return []  # no worker processes: the rows are this process's


@dataclass
class FitResult:
    # (n_u, C) float32, rows in shard order = unlabeled pool order; None: not predicted
    proba: np.ndarray | None
    objective: list[float] = field(default_factory=list)  # one per round
    rounds: int = 0
    seconds: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)


def fit(backend: Backend, executor: Executor, x_l: np.ndarray, y_l: np.ndarray,
        max_rounds: int = 10_000,
        progress: Callable[[int, float], None] | None = None,
        predict: bool = True) -> FitResult:
    """Fit ``backend`` over the executor's shards and (``predict``) gather the probabilities
    of every unlabeled row."""
    t0 = time.perf_counter()
    backend.init(x_l, y_l)
    objective: list[float] = []
    while not backend.converged and len(objective) < max_rounds:
        objective.append(float(backend.merge(executor.stats(backend.state_dict()))))
        if progress is not None:
            progress(len(objective), objective[-1])
    proba = np.concatenate(executor.predict(backend.state_dict()), axis=0) if predict else None
    return FitResult(proba, objective, len(objective), time.perf_counter() - t0,
                     backend.state_dict())
