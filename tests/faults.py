"""Fault injection for the tests that prove raysl survives dying actors and workers (a test
helper: ``from faults import ...``; pytest puts tests/ on sys.path).

A fault fires once: it creates ``marker`` when it fires and stays quiet while the file exists,
so the retried call or the restarted worker goes through.

Ray's workers cannot import this module (tests/ is not on their path), so it is registered
with Ray's cloudpickle to be pickled by value: a Fault, a FaultyFactory or a
:func:`failing_loop` sent to an actor or a Ray Train worker carries its code along.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import ray.cloudpickle

from raysl.backends.base import Backend, BackendFactory, FitContext, Shard


@dataclass(frozen=True)
class Fault:
    marker: str  # path of the file that records that the fault fired
    at: int = 0  # the round (backends) or epoch (training) to fail in
    shard: int = 0  # which shard's actor (backends) or rank (training) fails
    exit: bool = True  # kill the process (os._exit) rather than raise

    def fire(self, at: int, who: int) -> None:
        if at != self.at or who != self.shard or Path(self.marker).exists():
            return
        Path(self.marker).touch()
        if self.exit:
            os._exit(1)
        raise RuntimeError(f"injected fault at {at}")


class FaultyBackend:
    """Wraps a backend; its ``shard_stats`` dies in the fault's round on the fault's shard."""

    def __init__(self, inner: Backend, fault: Fault) -> None:
        self.inner, self.fault, self.round = inner, fault, 0

    def init(self, x_l: np.ndarray, y_l: np.ndarray) -> None:
        self.inner.init(x_l, y_l)

    @property
    def converged(self) -> bool:
        return self.inner.converged

    def shard_stats(self, shard: Shard) -> Any:
        self.fault.fire(self.round, shard.index)
        return self.inner.shard_stats(shard)

    def merge(self, stats: Sequence[Any]) -> float:
        self.round += 1
        return self.inner.merge(stats)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.inner.predict_proba(x)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.round = state["round"]


class FaultyFactory:
    """A picklable factory: ``FaultyFactory(BACKENDS["gmm"], fault)``."""

    def __init__(self, factory: BackendFactory, fault: Fault) -> None:
        self.factory, self.fault = factory, fault

    def __call__(self, cfg: Any, ctx: FitContext) -> Backend:
        return FaultyBackend(self.factory(cfg, ctx), self.fault)


def failing_loop(fault: Fault) -> Callable[[dict[str, Any]], Any]:
    """A per-worker function for ``train_classifier(..., loop=failing_loop(fault))``: raysl's
    own worker loop, with ``run_epoch`` patched in the worker's process so that the fault
    fires halfway through the fault's epoch on the fault's rank (``fault.shard``)."""

    def loop(config: dict[str, Any]) -> Any:
        from raysl import train
        from raysl.distributed import trainer

        real = train.run_epoch

        def run_epoch(model: Any, opt: Any, data: Any, cfg: Any, epoch: int, rank: int = 0,
                      world_size: int = 1, device: Any = "cpu",
                      on_step: Callable[[int, int], None] | None = None, **kw: Any) -> Any:
            def step(s: int, steps: int) -> None:
                if on_step is not None:
                    on_step(s, steps)
                if s == steps // 2:
                    fault.fire(epoch, rank)

            return real(model, opt, data, cfg, epoch, rank, world_size, device, step, **kw)

        with mock.patch.object(train, "run_epoch", run_epoch):  # what train_loop calls
            return trainer._worker_loop(config)

    return loop


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
