"""The joint training step and epoch, in plain PyTorch (no Ray).

Ray Train (``raysl.distributed.trainer``) calls :func:`run_epoch` on every DDP worker; tests
call it directly. Batches are drawn from per-(seed, epoch, rank) generators, so

- a resumed run redoes an epoch exactly (an epoch is safe to repeat after a crash);
- the labeled stream does not depend on the pseudo-labeled one, so ``lambda_u = 0`` (or no
  kept pseudo-label) is exactly supervised training with the same budget;
- pseudo-labeled rows are split across ranks like a DistributedSampler would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raysl.config import TrainConfig
from raysl.losses import joint_loss


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


def steps_per_epoch(n_u: int, cfg: TrainConfig, world_size: int) -> int:
    """One pass over the unlabeled pool at ``mu × batch_size`` rows per step and worker."""
    return max(1, math.ceil(n_u / (cfg.mu * cfg.batch_size * max(world_size, 1))))


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Cosine decay (FixMatch's 7π/16 variant): a pure function of the step, so resuming
    from a checkpoint needs no scheduler state."""
    return cfg.lr * math.cos(7 * math.pi * step / (16 * max(total_steps, 1)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def run_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: TrainData, cfg: TrainConfig,
              epoch: int, rank: int = 0, world_size: int = 1,
              device: torch.device | str = "cpu",
              on_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Train one epoch on this rank's share of the batches; returns mean losses.

    ``on_step(step, steps)`` is called after every optimizer step (progress, fault tests)."""
    steps = steps_per_epoch(data.n_u, cfg, world_size)
    total = steps * cfg.epochs
    torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)  # dropout, per epoch & rank
    idx_l = _rng(cfg.seed, epoch, rank, 0).integers(0, len(data.y_l), (steps, cfg.batch_size))
    use_p = cfg.lambda_u > 0 and len(data.y_p) > 0
    if use_p:
        # The same permutation on every rank, then a rank-strided share (DistributedSampler).
        perm = _rng(cfg.seed, epoch, 1).permutation(len(data.y_p))[rank::world_size]
        if len(perm) == 0:
            perm = _rng(cfg.seed, epoch, rank, 2).integers(0, len(data.y_p), 1)
        need = steps * cfg.mu * cfg.batch_size
        idx_p = np.resize(perm, need).reshape(steps, -1)  # cycles when there are few rows
    model.train()
    sums = np.zeros(3)
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, epoch * steps + s, total)
        xl = torch.from_numpy(data.x_l[idx_l[s]]).to(device)
        yl = torch.from_numpy(data.y_l[idx_l[s]]).to(device)
        if use_p:
            xp = torch.from_numpy(data.x_p[idx_p[s]]).to(device)
            logits = model(torch.cat([xl, xp]))
            loss, sup, unsup = joint_loss(
                logits[: len(xl)], yl, logits[len(xl):],
                torch.from_numpy(data.y_p[idx_p[s]]).to(device),
                torch.from_numpy(data.w_p[idx_p[s]]).to(device), cfg.lambda_u)
        else:
            loss, sup, unsup = joint_loss(model(xl), yl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += [loss.item(), sup.item(), unsup.item()]
        if on_step is not None:
            on_step(s, steps)
    mean = (sums / steps).tolist()  # plain floats: checkpoints load with weights_only=True
    return {"loss": mean[0], "loss_sup": mean[1], "loss_unsup": mean[2], "steps": steps}


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu",
                  batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities (n, C) for rows ``x`` (n, ...)."""
    model.eval()
    out = [torch.softmax(model(torch.tensor(x[i:i + batch_size], device=device)), 1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


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
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
