"""Evaluation of pseudo-labels and models (pure numpy)."""

from __future__ import annotations

import numpy as np

from raysl.select import Selection


def pseudo_label_metrics(sel: Selection, y_true: np.ndarray) -> dict[str, float]:
    """Coverage (kept / all unlabeled rows); precision of the kept labels and accuracy of all
    argmax labels, both measured on the rows whose true label is known (``y_true >= 0``);
    NaN where no row qualifies."""
    known = y_true >= 0
    kept = sel.mask & known
    correct = sel.labels == y_true
    return {
        "coverage": sel.coverage,
        "n_selected": int(sel.mask.sum()),
        "precision": float(correct[kept].mean()) if kept.any() else float("nan"),
        "argmax_accuracy": float(correct[known].mean()) if known.any() else float("nan"),
    }


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """ECE of ``proba`` (n, C) against ``y_true`` (n,) over equal-width confidence bins."""
    # not proba[known]: no copy of the whole (n, C) array
    return ece_from(proba.max(1), proba.argmax(1), y_true, bins)


def ece_from(conf: np.ndarray, pred: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """ECE from each row's confidence (n,) and predicted class (n,) against ``y_true`` (n,)
    (rows with ``y_true < 0`` are left out)."""
    known = y_true >= 0
    conf = conf[known]
    correct = pred[known] == y_true[known]
    if len(conf) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)
