"""Training losses (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def supervised_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of logits (n, C) against labels (n,) int64, averaged."""
    return F.cross_entropy(logits, y)


def pseudo_label_loss(logits: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
    """Confidence-weighted cross-entropy on pseudo-labeled rows: logits (n, C), labels (n,),
    weights ``w`` (n,) in [0, 1]. Averaged over the batch (not over the kept rows), so a batch
    of low-confidence rows contributes little."""
    ce = F.cross_entropy(logits, y, reduction="none")  # (n,)
    return (ce * w).mean() if w is not None else ce.mean()


def joint_loss(logits_l: Tensor, y_l: Tensor, logits_u: Tensor | None = None,
               y_u: Tensor | None = None, w_u: Tensor | None = None,
               lambda_u: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The offline objective in one expression: :func:`supervised_loss` + ``lambda_u`` ×
    :func:`pseudo_label_loss` (what ``raysl.objectives`` sums term by term). Returns (total,
    supervised, unsupervised)."""
    sup = supervised_loss(logits_l, y_l)
    if logits_u is None or y_u is None or len(y_u) == 0:
        return sup, sup.detach(), torch.zeros((), device=sup.device)
    unsup = pseudo_label_loss(logits_u, y_u, w_u)
    return sup + lambda_u * unsup, sup.detach(), unsup.detach()


# -- online pseudo-labels (FixMatch and its adaptive thresholds) ---------------------------


def fixmatch_loss(logits_s: Tensor, probs_w: Tensor, threshold: float | Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """FixMatch's consistency loss: the weak view's argmax is the target of the strong view.

    ``logits_s`` (n, C) strong-view logits (with gradient); ``probs_w`` (n, C) weak-view
    probabilities (no gradient: from the student's detached output or the EMA teacher);
    ``threshold`` a float or per-class (C,) thresholds, applied to the pseudo-label's class.
    Averaged over the whole batch (not the kept rows), as in FixMatch.
    Returns (loss, mask (n,) float, pseudo-labels (n,) int64)."""
    conf, pseudo = probs_w.max(dim=1)
    tau = threshold[pseudo] if isinstance(threshold, Tensor) else threshold
    mask = (conf >= tau).float()
    loss = (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()
    return loss, mask, pseudo


def align_distribution(probs: Tensor, p_model: Tensor, p_target: Tensor | None = None
                       ) -> Tensor:
    """Distribution alignment (ReMixMatch): scale ``probs`` (n, C) by ``p_target / p_model``
    (C,) and renormalize, so the average pseudo-label follows the target class distribution
    (uniform when ``p_target`` is None) instead of the model's running average ``p_model``."""
    target = p_target if p_target is not None else torch.full_like(p_model, 1 / len(p_model))
    q = probs * (target / p_model.clamp_min(1e-6))
    return q / q.sum(dim=1, keepdim=True)


def label_prior(labels: Tensor, conf: Tensor, n_classes: int) -> Tensor:
    """A backend's pseudo-label as a distribution (n, C): ``conf`` (n,) on ``labels`` (n,) and
    the rest spread evenly over the other classes (all that a stored selection keeps)."""
    rest = ((1 - conf) / (n_classes - 1)).clamp_min(1e-6)
    q = rest[:, None].expand(-1, n_classes).clone()
    q[torch.arange(len(labels)), labels] = conf.clamp_min(1e-6)
    return q


def apply_prior(probs: Tensor, prior: Tensor) -> Tensor:
    """Product of experts: ``probs × prior`` (n, C) renormalized. A confident pseudo-label
    needs both the model and the backend to agree; where they disagree the confidence drops
    below the threshold and the row is skipped."""
    q = probs * prior
    return q / q.sum(dim=1, keepdim=True)


def ema(old: Tensor, new: Tensor, momentum: float) -> Tensor:
    """``momentum × old + (1 - momentum) × new`` (running averages of batch statistics)."""
    return momentum * old + (1 - momentum) * new


def flexmatch_thresholds(label_hist: Tensor, n_classes: int, threshold: float,
                         warmup: bool = True) -> Tensor:
    """FlexMatch's per-class thresholds (C,) (Zhang et al. 2021, curriculum pseudo-labelling).

    ``label_hist`` (n_u,) int64: for each unlabeled row the last pseudo-label it got with
    confidence above ``threshold``, or -1. The learning effect of class c is
    sigma_c = #rows with that label, normalized by the best-learned class (or, with
    ``warmup``, by the rows still unused when there are more of those); the threshold is
    ``M(beta_c) × threshold`` with the convex map M(x) = x / (2 - x). All classes learned
    equally (and no unused rows) gives the fixed threshold for every class."""
    counts = torch.bincount(label_hist[label_hist >= 0], minlength=n_classes).float()  # (C,)
    norm = counts.max()
    if warmup:
        norm = torch.maximum(norm, (label_hist < 0).sum().float())
    beta = counts / norm.clamp_min(1.0)
    return beta / (2 - beta) * threshold


def freematch_update(tau: Tensor, p_local: Tensor, probs: Tensor, momentum: float = 0.999
                     ) -> tuple[Tensor, Tensor]:
    """FreeMatch's self-adaptive state (Wang et al. 2023), updated from weak-view ``probs``
    (n, C): the global threshold ``tau`` () is a running mean of the top confidence and
    ``p_local`` (C,) a running mean of the class probabilities. Start both at 1/C."""
    return (ema(tau, probs.max(dim=1).values.mean(), momentum),
            ema(p_local, probs.mean(dim=0), momentum))


def freematch_thresholds(tau: Tensor, p_local: Tensor) -> Tensor:
    """Per-class thresholds (C,): ``tau × p_local / max(p_local)`` (FreeMatch's MaxNorm)."""
    return tau * p_local / p_local.max()
