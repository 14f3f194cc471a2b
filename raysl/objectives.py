"""The training objectives, one class each, plugged into :func:`raysl.train.run_epoch`.

Every step, each objective draws its rows (``inputs``), the loop forwards all of them in one
pass and hands each objective its logits (``loss``); the step's loss is their sum. So

- ``Labeled``: cross-entropy on the labeled rows (weakly augmented with FixMatch);
- ``OfflinePseudoLabels``: the backend's kept pseudo-labels, confidence-weighted, with the
  weight schedule of ``train.offline`` (:func:`offline_weight`);
- ``FixMatch``: online pseudo-labels of the unlabeled pool's weak views (by the EMA teacher
  when there is one) as targets of the strong views, with fixed / FlexMatch / FreeMatch
  thresholds and optional distribution alignment.

Rows are drawn from per-(seed, epoch, rank) generators with a key per stream, so each stream
is independent of the others (``lambda_u = 0`` is exactly supervised training) and an epoch
redone after a crash sees the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from raysl import augment
from raysl.config import TrainConfig
from raysl.data import rank_share
from raysl.losses import (
    align_distribution,
    apply_prior,
    ema,
    fixmatch_loss,
    flexmatch_thresholds,
    freematch_thresholds,
    freematch_update,
    label_prior,
    pseudo_label_loss,
    supervised_loss,
)

if TYPE_CHECKING:
    from raysl.train import TrainData


class Objective(Protocol):
    """One term of the training loss."""

    def inputs(self, step: int) -> Tensor:
        """The rows ``(n, ...)`` to forward at ``step`` (on the device)."""

    def loss(self, step: int, logits: Tensor) -> Tensor:
        """This term's weighted loss from the logits ``(n, C)`` of :meth:`inputs`' rows."""

    def metrics(self, steps: int) -> dict[str, float]:
        """The epoch's metrics of this term (means over ``steps``)."""


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def rank_rows(n: int, steps: int, cfg: TrainConfig, epoch: int, rank: int, world_size: int,
              keys: tuple[int, int]) -> np.ndarray:
    """Row indices (steps, mu × batch_size) into ``n`` rows for this rank: its
    :func:`rank_share`, in a per-(seed, epoch) order, cycled when there are few rows. One rank
    draws a permutation of all ``n``. ``keys`` name the generators (permutation, the fallback
    when there are fewer rows than ranks), so each stream is independent of the others."""
    if n >= world_size:
        share = rank_share(n, rank, world_size)
        perm = share[rng(cfg.seed, epoch, keys[0]).permutation(len(share))]
    else:
        perm = rng(cfg.seed, epoch, rank, keys[1]).integers(0, n, 1)
    return np.resize(perm, steps * cfg.mu * cfg.batch_size).reshape(steps, -1)


def offline_weight(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Weight of the backend's kept pseudo-labels at a step: ``lambda_u`` throughout, except
    with FixMatch, where ``offline = warm`` fades it linearly to 0 at half the steps (the backend
    starts the model, the online labels take over) and ``none`` / ``prior`` use no targets."""
    if not cfg.fixmatch or cfg.offline == "targets":
        return cfg.lambda_u
    if cfg.offline == "warm":
        return cfg.lambda_u * max(0.0, 1 - 2 * step / max(total_steps, 1))
    return 0.0


def init_ssl_state(n_u: int, n_classes: int) -> dict[str, Tensor]:
    """The running statistics of online pseudo-labelling, saved with a checkpoint:
    ``p_model`` (C,) mean weak-view prediction (distribution alignment), ``tau`` () and
    ``p_local`` (C,) FreeMatch's global/local estimates, ``label_hist`` (n_u,) FlexMatch's last
    confident label per unlabeled row (-1: none yet). All start uninformed (1/C, -1)."""
    flat = torch.full((n_classes,), 1.0 / n_classes)
    return {"p_model": flat.clone(), "tau": torch.tensor(1.0 / n_classes),
            "p_local": flat.clone(), "label_hist": torch.full((n_u,), -1, dtype=torch.long)}


def gather(t: Tensor, world_size: int) -> Tensor:
    """Rows of ``t`` from every DDP rank (same shape on each), so that the running
    statistics of pseudo-labelling stay identical across ranks; ``t`` alone without DDP."""
    dist = torch.distributed
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return t
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def thresholds(cfg: TrainConfig, state: dict[str, Tensor], probs: Tensor,
               idx: Tensor) -> float | Tensor:
    """Threshold(s) for weak-view ``probs`` (n, C) of all ranks' unlabeled rows ``idx`` (n,);
    updates the adaptive state in place."""
    if cfg.threshold_mode == "fixed":
        return cfg.fixmatch_threshold
    if cfg.threshold_mode == "freematch":
        state["tau"], state["p_local"] = freematch_update(state["tau"], state["p_local"], probs)
        return freematch_thresholds(state["tau"], state["p_local"])
    # flexmatch: thresholds from the history so far, then record this batch's confident rows
    tau = flexmatch_thresholds(state["label_hist"], probs.shape[1], cfg.fixmatch_threshold)
    conf, label = probs.max(dim=1)
    keep = conf > cfg.fixmatch_threshold
    state["label_hist"][idx[keep]] = label[keep]
    return tau


Augment = Callable[[Tensor], Tensor]


class Labeled:
    """Cross-entropy on a batch of labeled rows per step (weak views with FixMatch)."""

    def __init__(self, data: TrainData, cfg: TrainConfig, epoch: int, rank: int, steps: int,
                 device: torch.device | str, weak: Augment | None) -> None:
        self.data, self.device, self.weak = data, device, weak
        self.idx = rng(cfg.seed, epoch, rank, 0).integers(0, len(data.y_l),
                                                          (steps, cfg.batch_size))
        self.total = 0.0

    def inputs(self, step: int) -> Tensor:
        x = torch.from_numpy(self.data.x_l[self.idx[step]])
        return (self.weak(x) if self.weak is not None else x).to(self.device)

    def loss(self, step: int, logits: Tensor) -> Tensor:
        y = torch.from_numpy(self.data.y_l[self.idx[step]]).to(self.device)
        loss = supervised_loss(logits, y)
        self.total += loss.item()
        return loss

    def metrics(self, steps: int) -> dict[str, float]:
        return {"loss_sup": self.total / steps}


class OfflinePseudoLabels:
    """The backend's kept pseudo-labels: confidence-weighted cross-entropy, weighted by
    :func:`offline_weight` at the global step."""

    def __init__(self, data: TrainData, cfg: TrainConfig, epoch: int, rank: int,
                 world_size: int, steps: int, device: torch.device | str) -> None:
        self.data, self.cfg, self.epoch, self.steps, self.device = data, cfg, epoch, steps, device
        self.idx = rank_rows(len(data.y_p), steps, cfg, epoch, rank, world_size, keys=(1, 2))
        self.total = 0.0

    def inputs(self, step: int) -> Tensor:
        return torch.from_numpy(self.data.x_p[self.idx[step]]).to(self.device)

    def loss(self, step: int, logits: Tensor) -> Tensor:
        rows = self.idx[step]
        unsup = pseudo_label_loss(logits, torch.from_numpy(self.data.y_p[rows]).to(self.device),
                                  torch.from_numpy(self.data.w_p[rows]).to(self.device))
        self.total += unsup.item()
        weight = offline_weight(self.cfg, self.epoch * self.steps + step,
                                self.steps * self.cfg.epochs)
        return weight * unsup

    def metrics(self, steps: int) -> dict[str, float]:
        return {"loss_unsup": self.total / steps}


class FixMatch:
    """Online pseudo-labels on ``mu × batch_size`` pool rows per step: the weak view's label
    (the EMA teacher's when there is one, else the student's) is the target of the strong view
    where its confidence passes the threshold. ``ssl_state`` (:func:`init_ssl_state`; created
    on first use if empty) carries adaptive thresholds and alignment across epochs."""

    def __init__(self, data: TrainData, cfg: TrainConfig, epoch: int, rank: int,
                 world_size: int, steps: int, device: torch.device | str,
                 gen: torch.Generator, teacher: nn.Module | None,
                 ssl_state: dict[str, Tensor]) -> None:
        assert data.x_u is not None
        self.data, self.cfg, self.world_size, self.device = data, cfg, world_size, device
        self.gen, self.teacher, self.state = gen, teacher, ssl_state
        self.idx = rank_rows(len(data.x_u), steps, cfg, epoch, rank, world_size, keys=(3, 5))
        self.use_prior = cfg.offline == "prior" and data.prior_label is not None
        # the rank's rows' true labels (an array, or the rank's share read with its rows)
        self.y_u = data.y_u
        # kept, correct among kept, known among kept, correct, known, all (label accuracy)
        self.counts = np.zeros(6)
        self.total = 0.0
        self.n = cfg.mu * cfg.batch_size
        self.weak_x: Tensor | None = None

    def inputs(self, step: int) -> Tensor:
        assert self.data.x_u is not None
        xu = torch.from_numpy(self.data.x_u[self.idx[step]])
        self.weak_x = augment.weak(xu, self.gen).to(self.device)
        strong = augment.strong(xu, self.gen).to(self.device)
        # without a teacher the student labels the weak view in the same forward pass
        return strong if self.teacher is not None else torch.cat([self.weak_x, strong])

    def loss(self, step: int, logits: Tensor) -> Tensor:
        cfg, state = self.cfg, self.state
        logits_s = logits[-self.n:]
        with torch.no_grad():
            logits_w = (self.teacher(self.weak_x) if self.teacher is not None
                        else logits[:self.n])
            probs = torch.softmax(logits_w.detach().float(), dim=1)  # (n, C)
            if not state:
                assert self.data.x_u is not None
                state.update(init_ssl_state(len(self.data.x_u), probs.shape[1]))
            iu = torch.from_numpy(self.idx[step])
            if self.use_prior:
                assert self.data.prior_label is not None and self.data.prior_conf is not None
                probs = apply_prior(probs, label_prior(
                    torch.from_numpy(self.data.prior_label[self.idx[step]]),
                    torch.from_numpy(self.data.prior_conf[self.idx[step]]).float(),
                    probs.shape[1]).to(probs.device))
            # gathered on the device (nccl needs CUDA tensors), kept on the CPU like the state
            all_probs = gather(probs, self.world_size).cpu()
            all_idx = gather(iu.to(probs.device), self.world_size).cpu()
            if cfg.dist_align:
                state["p_model"] = ema(state["p_model"], all_probs.mean(0), 0.999)
                probs = align_distribution(probs, state["p_model"].to(probs.device))
                all_probs = align_distribution(all_probs, state["p_model"])
            tau = thresholds(cfg, state, all_probs, all_idx)
            if isinstance(tau, Tensor):
                tau = tau.to(probs.device)
        fm, mask, pseudo = fixmatch_loss(logits_s, probs, tau)
        self._count(iu, mask, pseudo)
        self.total += fm.item()
        return cfg.lambda_u * fm

    def _count(self, iu: Tensor, mask: Tensor, pseudo: Tensor) -> None:
        kept = mask.cpu()
        if self.y_u is None:
            self.counts += [kept.sum().item(), 0, 0, 0, 0, len(kept)]
            return
        # fancy indexing copies: a writable array even from the read-only object store
        truth = torch.from_numpy(self.y_u[iu.numpy()])
        known = (truth >= 0).float()
        right = (pseudo.cpu() == truth).float() * known
        self.counts += [kept.sum().item(), (right * kept).sum().item(),
                        (known * kept).sum().item(), right.sum().item(), known.sum().item(),
                        len(truth)]

    def metrics(self, steps: int) -> dict[str, float]:
        kept, right_kept, known_kept, right, known, n = self.counts.tolist()
        return {"loss_fixmatch": self.total / steps, "mask_rate": kept / max(n, 1),
                "pl_precision": right_kept / known_kept if known_kept else float("nan"),
                "pl_accuracy": right / known if known else float("nan")}


def objectives(data: TrainData, cfg: TrainConfig, epoch: int, rank: int, world_size: int,
               steps: int, device: torch.device | str, teacher: nn.Module | None,
               ssl_state: dict[str, Tensor]) -> list[Any]:
    """The objectives ``cfg`` asks for, in forward order: labeled, then offline pseudo-labels
    (when kept rows exist and their weight can be non-zero), then FixMatch (when on and there is
    a pool). With every switch off, only ``Labeled``: no extra draw, no extra forward pass."""
    gen = None
    if cfg.fixmatch:
        # Augmentations from their own generator: a redone epoch sees the same views.
        gen = torch.Generator().manual_seed(int(rng(cfg.seed, epoch, rank, 4).integers(2**62)))
    weak = (lambda x: augment.weak(x, gen)) if gen is not None else None
    out: list[Any] = [Labeled(data, cfg, epoch, rank, steps, device, weak)]
    if (cfg.lambda_u > 0 and len(data.y_p) > 0
            and not (cfg.fixmatch and cfg.offline in ("none", "prior"))):
        out.append(OfflinePseudoLabels(data, cfg, epoch, rank, world_size, steps, device))
    if (cfg.fixmatch and cfg.lambda_u > 0 and data.x_u is not None and len(data.x_u) > 0
            and gen is not None):
        out.append(FixMatch(data, cfg, epoch, rank, world_size, steps, device, gen, teacher,
                            ssl_state))
    return out
