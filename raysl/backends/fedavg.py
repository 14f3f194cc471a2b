"""Federated averaging (FedAvg) for neural backends: the round logic the VAE and GAN share.

A neural backend is a :class:`LocalTrainer` (its model, optimisers, one local training step
and its class logits) wrapped in :class:`FedAvgBackend`, which implements the backend Protocol:

- ``init`` builds the model under ``ctx.seed`` and its optimisers; the state is the weights
  and the optimiser moments as numpy arrays, plus the round number;
- ``shard_stats`` (worker) loads that state into a fresh copy, trains ``local_epochs`` passes
  over the shard's unlabeled rows (each step also draws a labeled batch) with batches and noise
  drawn from generators seeded by ``(seed, round, shard.index)``, and returns
  ``(state arrays, n_rows, mean loss)``; the backend's own state is never touched;
- ``merge`` (driver) averages every array weighted by shard size and counts the round.

The optimiser moments are averaged with the weights, so with one shard a fit is exactly plain
local training continued across rounds (a test checks this). The learning rate is constant for
the first half of the rounds and then decays linearly (:func:`lr_factor`): the averaged model
settles instead of oscillating (GAN training especially).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from raysl.backends.base import FitContext, Shard
from raysl.backends.nets import ClassifierEmbedding, classifier_embedding


class LocalTrainer(Protocol):
    """What a neural backend supplies; FedAvg does the rest."""

    def build(self) -> nn.Module:
        """A fresh model holding every parameter (initialised from torch's global RNG)."""

    def optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]: ...

    def step(self, model: nn.Module, opts: list[torch.optim.Optimizer], x_u: Tensor,
             x_l: Tensor, y_l: Tensor, gen: torch.Generator) -> float:
        """One local update on an unlabeled batch ``x_u`` (b, ...) and a labeled batch
        ``x_l`` (b_l, ...), ``y_l`` (b_l,); random noise from ``gen``. Returns the loss."""

    def class_logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """(n, ...) -> (n, C) class logits (the labeler), in eval mode."""


@dataclass(frozen=True)
class Schedule:
    """The parts of a backend config the round loop reads."""

    rounds: int
    local_epochs: int
    batch_size: int
    labeled_batch_size: int


@contextmanager
def single_thread() -> Iterator[None]:
    """Shard workers run side by side (one actor per shard): one torch thread each. Restored
    afterwards, so a local (in-process) fit leaves the driver's thread count alone."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def seed_of(*key: int) -> int:
    """A 63-bit seed derived from integers (numpy's SeedSequence, so keys don't collide)."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> np.uint64(1))


# -- the state: weights and optimiser moments as flat numpy dicts ------------------------------

def pack(model: nn.Module, opts: Sequence[torch.optim.Optimizer]) -> dict[str, np.ndarray]:
    """``{"model.<name>": array, "opt<i>.<param index>.<key>": array}``."""
    out = {f"model.{k}": v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    for i, opt in enumerate(opts):
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                out[f"opt{i}.{pid}.{k}"] = (v.detach().cpu().numpy().copy()
                                            if isinstance(v, Tensor) else np.asarray(v))
    return out


def unpack(arrays: dict[str, np.ndarray], model: nn.Module,
           opts: Sequence[torch.optim.Optimizer]) -> None:
    """Inverse of :func:`pack` into a freshly built model and its optimisers."""
    model.load_state_dict({k[6:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
                           if k.startswith("model.")})
    for i, opt in enumerate(opts):
        state: dict[int, dict[str, Tensor]] = {}
        prefix = f"opt{i}."
        for k, v in arrays.items():
            if k.startswith(prefix):
                pid, name = k[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[name] = torch.from_numpy(np.array(v))
        if state:
            opt.load_state_dict({"state": state,
                                 "param_groups": opt.state_dict()["param_groups"]})


def fedavg(parts: Sequence[dict[str, np.ndarray]], sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """Average every array of ``parts`` weighted by ``sizes`` (shard rows).

    Sums in float64 and casts back, so one part (or identical parts) come back unchanged;
    integer arrays (step counts, BN counters) are rounded."""
    if not parts or len(parts) != len(sizes):
        raise ValueError(f"fedavg: {len(parts)} parts for {len(sizes)} sizes")
    w = np.asarray(sizes, np.float64)
    w = w / w.sum()
    out: dict[str, np.ndarray] = {}
    for k, first in parts[0].items():
        acc = sum(wi * p[k].astype(np.float64) for wi, p in zip(w, parts, strict=True))
        acc = np.asarray(acc)
        out[k] = (np.rint(acc) if np.issubdtype(first.dtype, np.integer) else acc
                  ).astype(first.dtype)
    return out


def lr_factor(rnd: int, rounds: int) -> float:
    """Learning-rate multiplier of round ``rnd`` (0-based): 1 for the first half of the rounds,
    then linear decay towards 0 (Salimans et al. 2016), so the averaged model settles."""
    return min(1.0, 2.0 * (rounds - rnd) / max(rounds, 1))


def local_steps(n_u: int, sched: Schedule) -> int:
    """Steps in one round on a shard of ``n_u`` unlabeled rows."""
    return sched.local_epochs * max(1, math.ceil(n_u / sched.batch_size))


def train_local(trainer: LocalTrainer, model: nn.Module, opts: list[torch.optim.Optimizer],
                shard: Shard, sched: Schedule, seed: int, rnd: int) -> float:
    """One round of local training on ``shard``; returns the mean step loss.

    Batches come from numpy, noise from a torch generator, both seeded by
    ``(seed, rnd, shard.index)``; torch's global RNG (dropout) is seeded the same way inside a
    fork, so the caller's RNG is untouched and the round is reproducible."""
    key = seed_of(seed, rnd, shard.index)
    rng = np.random.default_rng(key)
    gen = torch.Generator().manual_seed(key)
    x_u = torch.from_numpy(np.ascontiguousarray(shard.x_u, np.float32))
    # copies: the labeled rows are few, and on an actor they are read-only arrays from the
    # object store, which torch.from_numpy warns about
    x_l = torch.tensor(np.asarray(shard.x_l, np.float32))
    y_l = torch.tensor(np.asarray(shard.y_l, np.int64))
    steps = local_steps(len(x_u), sched)
    for opt in opts:
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])  # the base rate (as torch's schedulers keep it)
            g["lr"] = g["initial_lr"] * lr_factor(rnd, sched.rounds)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        model.train()
        for _ in range(steps):
            iu = torch.from_numpy(rng.integers(0, len(x_u), sched.batch_size))
            il = torch.from_numpy(rng.integers(0, len(x_l), sched.labeled_batch_size))
            losses.append(trainer.step(model, opts, x_u[iu], x_l[il], y_l[il], gen))
    return float(np.mean(losses))


class FedAvgBackend:
    """The backend Protocol over a :class:`LocalTrainer` (see the module docstring).

    With an ``embedding`` the networks see rows through the baseline classifier's penultimate
    layer instead of the inputs (``features="embedding"``): each worker embeds its shard and
    the labeled set once, and the embedding is standardized with the labeled rows' mean per
    column and one overall scale (:func:`embedding_scaling`), fixed in ``init`` and carried in
    the state, so every worker and ``predict_proba`` use the same map."""

    def __init__(self, trainer: LocalTrainer, sched: Schedule, ctx: FitContext,
                 embedding: ClassifierEmbedding | None = None) -> None:
        self.trainer = trainer
        self.sched = sched
        self.ctx = ctx
        self.embedding = embedding
        self.state: dict[str, Any] = {}
        self._model: nn.Module | None = None  # built lazily from the state, for predict
        # a worker's own rows (its shard, the labeled set) standardized in the embedding:
        # (array, shift, scale, rows as the networks see them), see _inputs
        self._kept: list[tuple[np.ndarray, np.ndarray, float, np.ndarray]] = []

    def _inputs(self, x: np.ndarray, keep: bool = False) -> np.ndarray:
        """Rows ``x`` (n, ...) as the networks see them: the inputs, or their standardized
        embedding (n, width) float32. ``keep``: a worker's own rows, which it trains on every
        round: embedded and standardized once (the map is fixed in ``init``), kept by
        identity."""
        if self.embedding is None:
            return x
        shift, scale = self.state["shift"], self.state["scale"]
        for arr, s, c, z in self._kept:
            if arr is x and c == scale and np.array_equal(s, shift):
                return z
        z = ((self.embedding(x) - shift) / scale).astype(np.float32)
        if keep:
            self._kept = [*self._kept[-3:], (x, shift, scale, z)]
        return z

    # -- driver side ---------------------------------------------------------------------
    def init(self, x_l: np.ndarray, y_l: np.ndarray) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(self.ctx.seed))
            model = self.trainer.build()
        scaling = {} if self.embedding is None else embedding_scaling(self.embedding(x_l))
        self.load_state_dict({"round": 0, "arrays": pack(model, self.trainer.optimizers(model)),
                              **scaling})

    @property
    def converged(self) -> bool:
        return int(self.state.get("round", 0)) >= self.sched.rounds

    def merge(self, stats: Sequence[tuple[dict[str, np.ndarray], int, float]]) -> float:
        """FedAvg of the shards' trained states; returns their size-weighted mean loss."""
        parts, sizes, losses = zip(*stats, strict=True)
        objective = float(np.average(losses, weights=np.asarray(sizes, np.float64)))
        self.load_state_dict({**self.state, "round": int(self.state["round"]) + 1,
                              "arrays": fedavg(parts, sizes)})
        return objective

    # -- worker side ---------------------------------------------------------------------
    def shard_stats(self, shard: Shard) -> tuple[dict[str, np.ndarray], int, float]:
        """Train a copy of the current model on ``shard``: (state arrays, n_u, mean loss)."""
        with single_thread():
            if self.embedding is not None:
                shard = Shard(self._inputs(shard.x_u, keep=True),
                              self._inputs(shard.x_l, keep=True), shard.y_l, shard.index)
            model, opts = self._fresh()
            loss = train_local(self.trainer, model, opts, shard, self.sched, self.ctx.seed,
                               int(self.state["round"]))
            return pack(model, opts), len(shard.x_u), loss

    def _fresh(self) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
        with torch.random.fork_rng(devices=[]):
            model = self.trainer.build()  # the initial values are overwritten just below
        opts = self.trainer.optimizers(model)
        unpack(self.state["arrays"], model, opts)
        return model, opts

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Softmax of the class logits, (n, C) float64, for rows ``x`` (n, ...)."""
        if self._model is None:
            self._model, _ = self._fresh()
        model = self._model.eval()
        x = self._inputs(x)
        out = [torch.softmax(self.trainer.class_logits(
            model, torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32))
        ).double(), 1) for i in range(0, len(x), batch_size)]
        if not out:
            return np.zeros((0, self.ctx.n_classes))
        return torch.cat(out).numpy()

    def state_dict(self) -> dict[str, Any]:
        return {**self.state, "arrays": dict(self.state["arrays"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {**state, "round": int(state["round"]), "arrays": dict(state["arrays"])}
        self._model = None


def embedding_scaling(f_l: np.ndarray) -> dict[str, Any]:
    """The standardization of embedded rows, from the labeled rows' embedding ``f_l``
    (n_l, width): ``{"shift": mean per column (width,), "scale": one overall standard
    deviation}`` (one scale, not one per column: a column the few labeled rows leave at 0, a
    dead ReLU for them, may not be dead on the pool). The labeled rows are on every worker, so
    the map does not depend on the sharding."""
    shift = f_l.mean(0)
    scale = float(np.sqrt(((f_l - shift) ** 2).mean())) if len(f_l) else 0.0
    return {"shift": shift, "scale": scale if scale > 0 else 1.0}


class TrainerFactory(Protocol):
    def __call__(self, cfg: Any, ctx: FitContext) -> LocalTrainer: ...


def make_fedavg(trainer: TrainerFactory, cfg: Any, ctx: FitContext, key: str) -> FedAvgBackend:
    """A neural backend: ``trainer(cfg, ctx)`` under FedAvg, with ``cfg``'s schedule
    (``rounds``, ``local_epochs``, ``batch_size``, ``labeled_batch_size``) and feature space
    (``features``: "inputs" or "embedding", ``key`` its config key for errors). In the
    embedding the trainer builds its networks for vectors of the embedding's width."""
    sched = Schedule(cfg.rounds, cfg.local_epochs, cfg.batch_size, cfg.labeled_batch_size)
    emb = classifier_embedding(cfg.features, ctx, key, "inputs")
    net_ctx = ctx if emb is None else replace(ctx, input_shape=(emb.width,))
    return FedAvgBackend(trainer(cfg, net_ctx), sched, ctx, emb)
