"""Training losses (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def joint_loss(logits_l: Tensor, y_l: Tensor, logits_u: Tensor | None = None,
               y_u: Tensor | None = None, w_u: Tensor | None = None,
               lambda_u: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """CE on labeled rows + ``lambda_u`` × confidence-weighted CE on pseudo-labeled rows.

    Shapes: logits (n, C), targets (n,) int64, weights ``w_u`` (n_u,) in [0, 1].
    The unlabeled term is averaged over the pseudo-labeled batch (not over the kept rows), so a
    batch of low-confidence rows contributes little. Returns (total, supervised, unsupervised).
    """
    sup = F.cross_entropy(logits_l, y_l)
    if logits_u is None or y_u is None or len(y_u) == 0:
        return sup, sup.detach(), torch.zeros((), device=sup.device)
    ce = F.cross_entropy(logits_u, y_u, reduction="none")  # (n_u,)
    unsup = (ce * w_u).mean() if w_u is not None else ce.mean()
    return sup + lambda_u * unsup, sup.detach(), unsup.detach()
