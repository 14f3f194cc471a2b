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


def select(proba: np.ndarray, criterion: str = "threshold", threshold: float = 0.95,
           k_best: int = 100) -> Selection:
    """Pick pseudo-labels from class probabilities ``proba`` (n_u, C).

    ``threshold``: keep rows whose confidence exceeds ``threshold`` (strictly, as scikit-learn's
    SelfTrainingClassifier does, so 1.0 keeps nothing and 0.0 keeps everything).
    ``k_best``: keep the ``k_best`` most confident rows (all rows if there are fewer; ties go
    to the lower row index).
    """
    labels = proba.argmax(axis=1).astype(np.int64)
    conf = proba.max(axis=1)
    if criterion == "threshold":
        mask = conf > threshold
    elif criterion == "k_best":
        order = np.argsort(-conf, kind="stable")[:k_best]
        mask = np.zeros(len(conf), bool)
        mask[order] = True
    else:
        raise ValueError(f"select.criterion={criterion!r}: must be 'threshold' or 'k_best'")
    return Selection(mask, labels, conf)
