"""The joint training step and epoch, in plain PyTorch (no Ray).

Ray Train (``raysl.distributed.trainer``) calls :func:`run_epoch` on every DDP worker; tests
call it directly. Batches are drawn from per-(seed, epoch, rank) generators, so

- a resumed run redoes an epoch exactly (an epoch is safe to repeat after a crash);
- the labeled stream does not depend on the pseudo-labeled one, so ``lambda_u = 0`` (or no
  kept pseudo-label) is exactly supervised training with the same budget;
- each rank trains on a fixed share of the pseudo-labeled and unlabeled rows (every
  world-size-th row, :func:`raysl.data.rank_share`), in a new order every epoch, so
  a Ray Train rank reads only its own rows (:meth:`TrainData.for_rank`).

With ``cfg.fixmatch`` the step also draws ``mu × batch_size`` rows of the unlabeled pool
``x_u``, labels their weak view online (the EMA teacher's prediction when there is one, else
the student's), keeps the confident ones (fixed, FlexMatch or FreeMatch thresholds, after
optional distribution alignment) and adds the strong view's CE on them. Labeled rows then get
the weak augmentation too. With every new switch off, nothing changes: no extra random draw,
no extra forward pass.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raysl.config import TrainConfig
from raysl.data import Remote, find_sorted, rank_share
from raysl.models import build_model
from raysl.objectives import objectives

logger = logging.getLogger("raysl")


@dataclass(frozen=True, eq=False)
class TrainData:
    """Arrays a training run needs. ``x_p, y_p, w_p``: kept pseudo-labeled rows, their labels
    and weights (confidences); empty for supervised training. ``n_u`` (the whole unlabeled pool)
    sets the epoch length, so that every run on a split has the same budget."""

    x_l: np.ndarray  # (n_l, ...)
    y_l: np.ndarray  # (n_l,)
    x_p: np.ndarray  # (n_p, ...)
    y_p: np.ndarray  # (n_p,)
    w_p: np.ndarray  # (n_p,)
    x_val: np.ndarray
    y_val: np.ndarray
    n_u: int
    # the unlabeled pool, for online pseudo-labels (cfg.fixmatch); None: offline only
    x_u: np.ndarray | None = None  # (n_u, ...)
    # true labels of x_u where known, else -1: only to measure the online pseudo-labels'
    # accuracy; never used for training
    y_u: np.ndarray | None = None  # (n_u,)
    # the backend's label and confidence for every row of x_u (cfg.offline = "prior")
    prior_label: np.ndarray | None = None  # (n_u,) int64
    prior_conf: np.ndarray | None = None  # (n_u,) float32

    def for_rank(self, rank: int, world_size: int,
                 read: Callable[[str, np.ndarray], np.ndarray | dict[str, np.ndarray]]
                 ) -> TrainData:
        """This data as rank ``rank`` trains on it: the row fields left in Ray's object store
        (``x_p``, ``x_u`` of a split read by :func:`raysl.distributed.pool.distribute`) become
        :class:`RankRows` of this rank's share (:func:`raysl.data.rank_share`), whose
        rows ``read(field, positions)`` returns (Ray Train: the rank's dataset shard); arrays
        stay as they are. ``read`` may return a dict: the rows as ``x`` and per-row fields
        read with them (``y_p``, ``w_p`` with ``x_p``; ``y_u``, ``prior_label``,
        ``prior_conf`` with ``x_u``), which become :class:`RankRows` of the share too."""
        fields: dict[str, Any] = {}

        def local(field: str) -> Any:
            x = getattr(self, field)
            if not isinstance(x, Remote):
                return x
            share = rank_share(len(x), rank, world_size)
            got = read(field, share)
            if isinstance(got, dict):
                fields.update({k: RankRows(v, share, len(x)) for k, v in got.items()
                               if k != "x"})
                got = got["x"]
            return RankRows(got, share, len(x))

        x_p, x_u = local("x_p"), None if self.x_u is None else local("x_u")
        return replace(self, x_p=x_p, x_u=x_u, **fields)


class RankRows:
    """A rank's share of ``n`` rows ``(n, ...)``, indexed by their positions among all ``n``
    (what the loop's row streams draw, :func:`raysl.objectives.rank_rows`): ``rows[i]`` is the
    row at position ``share[i]``. Indexing a position outside the share is an error."""

    def __init__(self, rows: np.ndarray, share: np.ndarray, n: int) -> None:
        if len(rows) != len(share):
            raise ValueError(f"{len(rows)} rows for a share of {len(share)} positions")
        self.rows, self.share, self.n = rows, share, n
        self.shape = (n, *rows.shape[1:])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        at, hit = find_sorted(self.share, np.asarray(idx))
        if not hit.all():
            raise IndexError("positions outside this rank's share")
        return self.rows[at]


def steps_per_epoch(n_u: int, cfg: TrainConfig, world_size: int) -> int:
    """One pass over the unlabeled pool at ``mu × batch_size`` rows per step and worker, but
    at least ``min_steps`` in all: a pool of a hundred rows would otherwise give a couple of
    steps per epoch, far too few to train any network."""
    one_pass = math.ceil(n_u / (cfg.mu * cfg.batch_size * max(world_size, 1)))
    return max(1, one_pass, math.ceil(cfg.min_steps / cfg.epochs))


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Cosine decay (FixMatch's 7π/16 variant): a pure function of the step, so resuming
    from a checkpoint needs no scheduler state."""
    return cfg.lr * math.cos(7 * math.pi * step / (16 * max(total_steps, 1)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """EMA decay at a global step, warmed up as ``(1 + t) / (10 + t)`` so the teacher is not
    dominated by its random initial weights (a pure function of the step: resumable)."""
    return min(cfg.ema, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay × teacher + (1 - decay) × student, parameter by parameter; buffers
    are copied (the models have none today)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_mul_(t_params, decay)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        tb.copy_(sb)


def run_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: TrainData, cfg: TrainConfig,
              epoch: int, rank: int = 0, world_size: int = 1,
              device: torch.device | str = "cpu",
              on_step: Callable[[int, int], None] | None = None,
              teacher: nn.Module | None = None,
              ssl_state: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Train one epoch on this rank's share of the batches: every step, each objective of
    :func:`raysl.objectives.objectives` draws its rows, one forward pass runs over all of them,
    and the step's loss is the sum of the objectives' losses. Returns the mean losses (and,
    with ``cfg.fixmatch``, the online pseudo-labels' mask rate and accuracy).

    ``on_step(step, steps)`` is called after every optimizer step (progress, fault tests).
    ``teacher``: the EMA copy of the (unwrapped) model, updated after every step when
    ``cfg.ema > 0``; with ``cfg.fixmatch`` it labels the weak views. ``ssl_state`` (see
    :func:`raysl.objectives.init_ssl_state`; created on first use if empty) carries the adaptive
    thresholds and distribution alignment across epochs: keep it and checkpoint it with the
    model."""
    steps = steps_per_epoch(data.n_u, cfg, world_size)
    total = steps * cfg.epochs
    torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)  # dropout, per epoch & rank
    terms = objectives(data, cfg, epoch, rank, world_size, steps, device, teacher,
                       ssl_state if ssl_state is not None else {})
    model.train()
    if teacher is not None:
        teacher.eval()  # no dropout in the labeller
    loss_sum = 0.0
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, epoch * steps + s, total)
        parts = [t.inputs(s) for t in terms]
        logits = model(torch.cat(parts)) if len(parts) > 1 else model(parts[0])
        outs = torch.split(logits, [len(p) for p in parts])
        losses = [t.loss(s, out) for t, out in zip(terms, outs, strict=True)]
        loss = sum(losses[1:], losses[0])  # left to right: sup + offline + fixmatch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if teacher is not None and cfg.ema > 0:
            ema_update(teacher, unwrap(model), ema_decay(cfg, epoch * steps + s))
        loss_sum += loss.item()
        if on_step is not None:
            on_step(s, steps)
    # plain floats: checkpoints load with weights_only=True
    row: dict[str, float] = {"loss": loss_sum / steps, "loss_unsup": 0.0}
    for t in terms:
        row.update(t.metrics(steps))
    row["steps"] = steps
    return row


@dataclass
class TrainOutcome:
    """What a training run returns (in-process or from Ray Train's rank 0)."""

    state: dict[str, Any]  # the final model's state dict (EMA teacher if on), numpy arrays
    history: list[dict[str, float]]  # one row per epoch
    seconds: float = 0.0
    resumed_from_epoch: int = -1  # -1 when the run started fresh
    nodes: list[str] = field(default_factory=list)  # the Ray node of each rank (Ray Train)
    # per rank, the rows it read through Ray Data by field ({"x_p": n, "x_u": n}; none when
    # it was handed arrays), "on_disk": the fields it kept in a file-backed array
    # (train.share_storage), "memory": its raysl.memory.process_memory() after the loop
    rank_rows: list[dict[str, Any]] = field(default_factory=list)


Snapshot = Callable[[], dict[str, Any]]


def train_loop(model: nn.Module, data: TrainData, cfg: TrainConfig, *, rank: int = 0,
               world_size: int = 1, device: torch.device | str = "cpu",
               resume: dict[str, Any] | None = None,
               on_epoch: Callable[[int, dict[str, Any], Snapshot], None] | None = None,
               on_step: Callable[[int, int, int], None] | None = None,
               name: str = "train", verbose: bool = False) -> tuple[nn.Module, list[dict], int]:
    """The training loop, the only one: ``cfg.epochs`` epochs of :func:`run_epoch`, each
    evaluated on ``data.x_val``. Ray Train's worker (``raysl.distributed.trainer``), the
    in-process run (:func:`fit_classifier`) and the benchmarks all call it.

    ``model``: the student, already wrapped for DDP when ``world_size > 1``. ``resume``: a
    snapshot from an earlier run (continue after its epoch). ``on_epoch(epoch, row, snapshot)``
    after every epoch (``snapshot()`` returns what a checkpoint holds); ``on_step(epoch, step,
    steps)`` after every optimizer step. Returns (the model to keep: the EMA teacher when
    ``cfg.ema > 0``, the history, the epoch resumed from or -1)."""
    opt = make_optimizer(model, cfg)
    # The EMA teacher: per rank, but identical on every rank (DDP keeps the students in sync),
    # so rank 0's is the model. It evaluates, labels the weak views and is the result.
    teacher = copy.deepcopy(unwrap(model)) if cfg.ema > 0 else None
    ssl_state: dict[str, Tensor] = {}  # adaptive thresholds, distribution alignment
    start, history, resumed = 0, [], -1
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if teacher is not None:
            teacher.load_state_dict(resume["teacher"])
        ssl_state.update(resume.get("ssl_state", {}))
        start, history, resumed = resume["epoch"] + 1, list(resume["history"]), resume["epoch"]
    kept = teacher if teacher is not None else unwrap(model)

    for epoch in range(start, cfg.epochs):
        t0, started_at = time.perf_counter(), time.time()
        step_hook = (None if on_step is None
                     else lambda s, n, e=epoch: on_step(e, s, n))  # type: ignore[misc]
        row: dict[str, Any] = run_epoch(model, opt, data, cfg, epoch, rank, world_size, device,
                                        step_hook, teacher=teacher, ssl_state=ssl_state)
        train_s = time.perf_counter() - t0
        row.update(epoch=epoch, val_accuracy=accuracy(kept, data.x_val, data.y_val, device),
                   epoch_seconds=time.perf_counter() - t0, train_seconds=train_s,
                   resumed_from_epoch=resumed,
                   started_at=started_at)  # wall clock: epoch-to-epoch time incl. reporting
        history.append(row)
        if rank == 0 and verbose:
            logger.info("[%s] epoch %d/%d loss=%.3f val_acc=%.3f (%.1fs)", name, epoch + 1,
                        cfg.epochs, row["loss"], row["val_accuracy"], row["epoch_seconds"])

        def snapshot(e: int = epoch) -> dict[str, Any]:
            saved = {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                     "epoch": e, "history": history, "ssl_state": ssl_state}
            if teacher is not None:
                saved["teacher"] = teacher.state_dict()
            return saved

        if on_epoch is not None:
            on_epoch(epoch, row, snapshot)
    return kept, history, resumed


def init_model(cfg: TrainConfig, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The classifier with its initial weights, a function of ``cfg.seed``: every rank, the
    in-process run and the benchmarks start from the same weights."""
    torch.manual_seed(cfg.seed)
    return build_model(input_shape, n_classes, cfg.hidden, cfg.init)


def fit_classifier(data: TrainData, cfg: TrainConfig, input_shape: tuple[int, ...],
                   n_classes: int, name: str = "train", verbose: bool = False) -> TrainOutcome:
    """Train the classifier in this process (no Ray, one rank): what Ray Train's single worker
    computes, without its start-up cost. For small data, notebooks and the estimator."""
    t0 = time.perf_counter()
    model = init_model(cfg, input_shape, n_classes)
    kept, history, _ = train_loop(model, data, cfg, name=name, verbose=verbose)
    return TrainOutcome(state_to_numpy(kept.state_dict()), history, time.perf_counter() - t0)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu",
                  batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities (n, C) for rows ``x`` (n, ...)."""
    model.eval()
    # an empty x still gives (0, C): one forward pass on no rows
    out = [torch.softmax(model(torch.tensor(x[i:i + batch_size], device=device)), 1).cpu()
           for i in range(0, max(len(x), 1), batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


@torch.no_grad()
def embed(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The classifier's penultimate-layer embedding (n, hidden) of rows ``x`` (n, ...), float64.

    A row's embedding is a function of the row alone, bit for bit, whatever other rows it is
    computed with and in whichever process: every forward pass has the same shape (the last
    batch is padded with zeros) and runs on one torch thread (a row's float32 result can change
    with the batch size and the thread count; measured on this machine's oneDNN kernels, and
    tested). So the GMM fitted on embeddings is the same for any sharding. Nodes with other CPU
    instruction sets may pick other kernels: there the guarantee is equality to rounding."""
    model.eval()
    inner = unwrap(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for i in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.array(x[i:i + batch_size], np.float32))  # a copy
            n = len(chunk)
            if n < batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
            out.append(inner.embed(chunk)[:n].numpy())
    finally:
        torch.set_num_threads(threads)
    if not out:
        width = inner.embed(torch.zeros((1, *x.shape[1:]))).shape[1]
        return np.zeros((0, width))
    return np.concatenate(out).astype(np.float64)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray,
             device: torch.device | str = "cpu") -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict_proba(model, x, device).argmax(1) == y).mean())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper."""
    return getattr(model, "module", model)


def state_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def state_from_numpy(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    # A copy: arrays from Ray's object store are read-only, which torch warns about.
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
