"""Fault injection, for the tests that prove raysl survives dying actors and workers.

A fault fires once: it creates ``marker`` when it fires and stays quiet while the file exists,
so the retried call or the restarted worker goes through.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
