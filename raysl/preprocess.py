"""Input preprocessing fitted from shard statistics and saved inside the model.

Feature vectors are standardized (zero mean, unit variance per column): a user's unscaled
columns (a feature in thousands beside one in fractions) otherwise leave SGD training and the
GMM's PCA dominated by the largest column. The statistics come from the training rows (labeled
rows plus the unlabeled shards), merged from per-shard moments with Chan et al.'s pairwise
update, so any shard count gives the same transform up to rounding. Images keep [0, 1].

The transform travels with the model (:class:`raysl.models.Standardize`, a module with
buffers), so a saved ``model.pt`` predicts on raw inputs. This module imports no torch: the
tasks that read a user's rows (:mod:`raysl.distributed.pool`) import it, and each Ray worker
would pay torch's import (about 1.2 s) for nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # raysl.data imports this module
    from torch import Tensor

    from raysl.data import Split

# Columns whose std is below this (relative to 1) are constant: scaled by 1, only centered.
_MIN_STD = 1e-8
# Moments are taken this many rows at a time and merged: a float64 copy of a block, not of all
# rows (a 346,485-row shard of 784 columns peaked at 4.35 GB of heap). The rows held in Ray's
# object store go through the same blocks (RemoteRows.blocks), so both give the same bits.
MOMENT_ROWS = 8192


@dataclass(frozen=True)
class Moments:
    """Per-column count, mean and sum of squared deviations of a set of rows."""

    n: int
    mean: np.ndarray  # (d,) float64
    m2: np.ndarray  # (d,) float64

    @staticmethod
    def of(x: np.ndarray) -> Moments:
        """Moments of rows ``x`` (n, d), :data:`MOMENT_ROWS` rows at a time."""
        x = np.asarray(x)
        x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        return Moments.of_blocks((x[a : a + MOMENT_ROWS] for a in range(0, len(x), MOMENT_ROWS)),
                                 x.shape[1])

    @staticmethod
    def of_blocks(blocks: Iterable[np.ndarray], d: int) -> Moments:
        """Moments of the rows of consecutive blocks (each (k, d), k > 0; none: no rows),
        merged in order: equal to ``of`` of their concatenation, bit for bit, when every block
        but the last has :data:`MOMENT_ROWS` rows."""
        total: Moments | None = None
        for b in blocks:
            b = np.asarray(b, np.float64).reshape(len(b), d)
            mean = b.mean(0)
            m = Moments(len(b), mean, ((b - mean) ** 2).sum(0))
            total = m if total is None else total + m
        return total if total is not None else Moments(0, np.zeros(d), np.zeros(d))

    def __add__(self, other: Moments) -> Moments:
        """Pairwise merge (Chan, Golub & LeVeque 1979): exact, and stable unlike Σx²."""
        n = self.n + other.n
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return Moments(n, mean, m2)


@dataclass(frozen=True, eq=False)
class Standardizer:
    """``(x - mean) / scale`` per column; ``scale`` is 1 for constant columns."""

    mean: np.ndarray  # (d,) float32
    scale: np.ndarray  # (d,) float32

    @staticmethod
    def from_moments(parts: Sequence[Moments]) -> Standardizer:
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        std = np.sqrt(total.m2 / max(total.n, 1))
        scale = np.where(std > _MIN_STD * np.maximum(1.0, np.abs(total.mean)), std, 1.0)
        return Standardizer(total.mean.astype(np.float32), scale.astype(np.float32))

    @staticmethod
    def fit(shards: Sequence[np.ndarray]) -> Standardizer:
        """From row blocks (each (n_i, d)): each block's moments, merged; so how the rows are
        split into blocks (shards) does not change the result beyond rounding."""
        return Standardizer.from_moments([Moments.of(s) for s in shards])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, d) raw -> (n, d) float32 standardized."""
        return ((np.asarray(x, np.float32) - self.mean) / self.scale).astype(np.float32)

    def state(self) -> dict[str, Tensor]:
        import torch

        return {"mean": torch.from_numpy(self.mean.copy()),
                "scale": torch.from_numpy(self.scale.copy())}


def standardize_split(split: Split, n_shards: int) -> Split:
    """The split with every x standardized by statistics of its training rows: the labeled rows
    and the ``n_shards`` unlabeled shards (as the shard actors see them). Images and splits that
    are already standardized come back unchanged."""
    from raysl.data import Remote, shard

    if len(split.input_shape) != 1 or split.standardizer is not None:
        return split
    pool = (split.x_u.moments() if isinstance(split.x_u, Remote)  # type: ignore[attr-defined]
            else [Moments.of(s) for s in shard(split.x_u, n_shards)])
    st = Standardizer.from_moments([Moments.of(split.x_l), *pool])
    key = hashlib.sha256(f"{split.key}:standardized".encode()).hexdigest()[:16]

    def apply(x: Any) -> Any:  # rows in the object store are standardized where fetched
        return x.with_transform(st) if isinstance(x, Remote) else st(x)

    return replace(split, x_l=st(split.x_l), x_u=apply(split.x_u), x_val=st(split.x_val),
                   x_test=apply(split.x_test), standardizer=st, key=key)
