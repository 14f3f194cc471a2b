"""Evaluation of pseudo-labels and models (pure numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from raysl.select import Selection


def pseudo_label_metrics(sel: Selection, y_true: np.ndarray) -> dict[str, float]:
    """Coverage (kept / all unlabeled rows); precision of the kept labels and accuracy of all
    argmax labels, both measured on the rows whose true label is known (``y_true >= 0``);
    NaN where no row qualifies."""
    n_classes = int(sel.labels.max()) + 1 if len(sel.labels) else 1
    m = summary_metrics([shard_summary(sel.labels, sel.conf, y_true, sel.mask, n_classes)])
    return {k: m[k] for k in ("coverage", "n_selected", "precision", "argmax_accuracy")}


def shard_summary(labels: np.ndarray, conf: np.ndarray, y_true: np.ndarray, mask: np.ndarray,
                  n_classes: int, bins: int = 15) -> dict[str, np.ndarray]:
    """What :func:`summary_metrics` needs of one shard's rows: counts, kept rows per class
    (C,) and :func:`ece_bins` of all its rows, from each row's argmax label, confidence, true
    label (-1: unknown) and whether it is kept (n_i,). The counts of shards add up."""
    known = y_true >= 0
    correct = known & (labels == y_true)
    return {"counts": np.array([len(mask), mask.sum(), (mask & known).sum(),
                                (mask & correct).sum(), known.sum(), correct.sum()], np.int64),
            "per_class": np.bincount(labels[mask], minlength=n_classes),
            "ece_bins": ece_bins(conf, labels, y_true, bins)}


def summary_metrics(parts: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """The pool's pseudo-label metrics from its shards' :func:`shard_summary`: coverage,
    ``n_selected``, precision and argmax accuracy on the rows whose true label is known (NaN:
    none), ``per_class`` kept counts and the ECE of every row's confidence (``ece``)."""
    n, kept, kept_known, kept_correct, known, correct = (
        int(v) for v in np.sum([p["counts"] for p in parts], axis=0))
    return {"coverage": kept / n if n else 0.0, "n_selected": kept,
            "precision": kept_correct / kept_known if kept_known else float("nan"),
            "argmax_accuracy": correct / known if known else float("nan"),
            "per_class": np.sum([p["per_class"] for p in parts], axis=0).tolist(),
            "ece": ece_from_bins(np.sum([p["ece_bins"] for p in parts], axis=0))}


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
