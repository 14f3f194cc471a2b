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
    return ece_from_bins(ece_bins(conf, pred, y_true, bins))


def ece_bins(conf: np.ndarray, pred: np.ndarray, y_true: np.ndarray, bins: int = 15
             ) -> np.ndarray:
    """Per equal-width confidence bin: rows, their summed confidence and their correct
    predictions (bins, 3), over the rows whose true label is known. Sums: the bins of parts of
    the rows add up to the bins of all of them (:func:`ece_from_bins`)."""
    known = y_true >= 0
    conf = np.asarray(conf[known], np.float64)
    correct = pred[known] == y_true[known]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return np.stack([np.bincount(which, minlength=bins).astype(np.float64),
                     np.bincount(which, conf, minlength=bins),
                     np.bincount(which, correct, minlength=bins)], axis=1)


def ece_from_bins(b: np.ndarray) -> float:
    """ECE (NaN without rows) from :func:`ece_bins` (bins, 3)."""
    n = b[:, 0].sum()
    if n == 0:
        return float("nan")
    m = b[:, 0] > 0
    return float(np.abs(b[m, 2] - b[m, 1]).sum() / n)
