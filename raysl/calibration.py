"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on held-out labeled rows.

Works from probabilities (any backend, including the GMM, gives probabilities): the logits are
recovered as log p up to a per-row constant, which softmax ignores, so
``apply_temperature(p, T) = softmax(log p / T)``. The argmax never changes, so pseudo-label
accuracy is unchanged; confidences, coverage at a threshold and calibration are.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

_EPS = 1e-12  # floor for log p: a zero probability would be an infinite logit


def apply_temperature(proba: np.ndarray, t: float) -> np.ndarray:
    """``softmax(log proba / t)``, (n, C) -> (n, C); ``t == 1`` returns the input."""
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    if t == 1.0:
        return proba
    return np.exp(log_softmax(np.log(np.maximum(proba, _EPS)) / t, axis=1))


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels ``y`` (n,) under ``proba`` (n, C)."""
    return float(-np.log(np.maximum(proba[np.arange(len(y)), y], _EPS)).mean())


def fit_temperature(proba: np.ndarray, y: np.ndarray, lo: float = 0.05,
                    hi: float = 20.0) -> float:
    """The T in [lo, hi] minimising the NLL of ``y`` (n,) under ``apply_temperature(proba, T)``
    (a 1-D convex problem in 1/T, solved on log T). 1.0 when there are no rows."""
    if len(y) == 0:
        return 1.0
    logp = np.log(np.maximum(proba, _EPS))

    def objective(log_t: float) -> float:
        lp = log_softmax(logp / np.exp(log_t), axis=1)
        return float(-lp[np.arange(len(y)), y].mean())

    res = minimize_scalar(objective, bounds=(np.log(lo), np.log(hi)), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))
