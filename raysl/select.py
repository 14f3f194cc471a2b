"""Choosing which pseudo-labels to keep (pure functions over cached probabilities)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Selection:
    mask: np.ndarray  # (n_u,) bool, rows kept
    labels: np.ndarray  # (n_u,) int64 argmax pseudo-label of every row
    conf: np.ndarray  # (n_u,) float, its probability

    @property
    def coverage(self) -> float:
        return float(self.mask.mean()) if len(self.mask) else 0.0

    def per_class(self, n_classes: int) -> list[int]:
        """How many rows are kept for each class."""
        return np.bincount(self.labels[self.mask], minlength=n_classes).tolist()


def class_prior(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Class distribution (C,) of labels ``y`` (n,) (rows with -1 ignored); uniform if empty."""
    counts = np.bincount(y[y >= 0], minlength=n_classes).astype(np.float64)
    return counts / counts.sum() if counts.sum() else np.full(n_classes, 1.0 / n_classes)


def align_to_prior(proba: np.ndarray, prior: np.ndarray,
                   p_model: np.ndarray | None = None) -> np.ndarray:
    """Distribution alignment in one shot: :func:`raysl.losses.align_distribution` (the online
    one FixMatch uses) with the backend's mean prediction as ``p_model`` (C,; default: the
    mean of ``proba``, else the whole pool's when ``proba`` (n, C) is one shard of it) and
    ``prior`` (C,) as the target. Returns (n, C) float64."""
    import torch

    from raysl.losses import align_distribution

    p = torch.from_numpy(np.asarray(proba, np.float64))
    # copies of the (C,) vectors: they may come read-only from Ray's object store, which
    # torch.from_numpy warns about in every shard actor's log
    mean = p.mean(0) if p_model is None else torch.tensor(p_model, dtype=torch.float64)
    return align_distribution(p, mean, torch.tensor(prior, dtype=torch.float64)).numpy()


def per_class_k(prior: np.ndarray, n_u: int, share: float) -> np.ndarray:
    """Rows to keep per class (C,): ``share`` of the rows the prior expects in a pool of
    ``n_u`` (at least 1 for a class the prior has)."""
    k = np.floor(prior * n_u * share).astype(np.int64)
    return np.where(prior > 0, np.maximum(k, 1), 0)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """½ Σ |p - q| of two distributions (C,): 0 identical, 1 disjoint."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def select(proba: np.ndarray, criterion: str = "threshold", threshold: float = 0.95,
           k_best: int = 100, prior: np.ndarray | None = None,
           share: float = 0.5) -> Selection:
    """Pick pseudo-labels from class probabilities ``proba`` (n_u, C): :func:`select_labels`
    of their argmax labels and probabilities."""
    return select_labels(proba.argmax(axis=1), proba.max(axis=1), proba.shape[1], criterion,
                         threshold, k_best, prior, share)


def select_labels(labels: np.ndarray, conf: np.ndarray, n_classes: int,
                  criterion: str = "threshold", threshold: float = 0.95, k_best: int = 100,
                  prior: np.ndarray | None = None, share: float = 0.5) -> Selection:
    """Pick pseudo-labels from each row's argmax label ``labels`` (n_u,) and its probability
    ``conf`` (n_u,), of ``n_classes`` classes (all that selection reads of the probabilities).

    ``threshold``: keep rows whose confidence exceeds ``threshold`` (strictly, as scikit-learn's
    SelfTrainingClassifier does, so 1.0 keeps nothing and 0.0 keeps everything).
    ``k_best``: keep the ``k_best`` most confident rows (all rows if there are fewer; ties go
    to the lower row index).
    ``per_class``: for each class c, the :func:`per_class_k` most confident rows labelled c
    (Yalniz et al. 2019; Noisy Student), so the kept labels follow ``prior`` (C,) (the labeled
    rows' distribution; uniform if None) instead of the backend's biases; when a class has
    fewer rows than that, every class keeps the same smaller share of its quota.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    mask = np.zeros(len(conf), bool)
    if criterion == "threshold":
        mask = conf > threshold
    elif criterion == "k_best":
        mask[np.argsort(-conf, kind="stable")[:k_best]] = True
    elif criterion == "per_class":
        prior = np.full(n_classes, 1.0 / n_classes) if prior is None else prior
        k = per_class_k(prior, len(conf), share)
        have = np.bincount(labels, minlength=n_classes)
        # A class the backend rarely predicts scales every class down alike, so the kept
        # labels keep the prior's proportions (rather than duplicating its few rows).
        fill = min(1.0, *(have[k > 0] / k[k > 0])) if (k > 0).any() else 1.0
        k = np.floor(k * fill + 1e-9).astype(np.int64)
        for c in range(n_classes):
            rows = np.flatnonzero(labels == c)
            mask[rows[np.argsort(-conf[rows], kind="stable")[:k[c]]]] = True
    else:
        raise ValueError(f"select.criterion={criterion!r}: must be 'threshold', 'k_best' or "
                         "'per_class'")
    return Selection(mask, labels, conf)
