"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on held-out labeled rows.

Works from probabilities (any backend, including the GMM, gives probabilities): the logits are
recovered as log p up to a per-row constant, which softmax ignores, so
``apply_temperature(p, T) = softmax(log p / T)``. The argmax never changes, so pseudo-label
accuracy is unchanged; confidences, coverage at a threshold and calibration are.

:func:`calibrate` is the safe version the pipeline uses (``backend.calibrate``, on by
default). With 5 validation rows per class an unguarded fit can collapse: when every
validation row's argmax is right, the NLL keeps falling as T -> 0 and the fit ends on its lower
bound (T = 0.05 was seen for ``self`` on digits), certainty the pool does not have. So T is
bounded to [:data:`T_MIN`, :data:`T_MAX`], and a fit that ends on the lower bound (no interior
optimum: the rows carry no evidence of how sharp to be) gives T = 1.

Measured (``raysl bench backends``, 48 fits: gmm in the inputs' PCA and in the embedding,
``self`` and LabelSpreading on digits at 5 and 10 labels per class, mnist5k and Fashion-MNIST
at 10, 3 seeds each): mean ECE on the pools 0.134 uncalibrated, 0.046 calibrated; NLL lower on
every one of the 48. Cross-validation on the validation rows was tried as a further guard (T = 1
unless T's 10-fold held-out NLL beats T = 1's) and dropped: with one or two misclassified
validation rows the held-out NLL swings on them, and it rejected good temperatures (the default
digits run's gmm, T = 4.04: pool ECE 0.039 -> 0.013), mean ECE 0.050.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

# Sharpening by more than 2 is never trusted from a few rows. The GMM's probabilities need
# T = 3-8 under the 1e-12 floor and up to 20 under its lower floors (GMM_FLOORS: its
# log-density ratios grow with the dimension).
T_MIN = 0.5
T_MAX = 30.0

# Floor for log p: a zero probability would be an infinite logit. It also bounds how far T
# can flatten: at T = 7.7 a row's top class stays below 0.8 with 10 classes. A floor at 1e-300
# was tried: on Fashion-MNIST the few rows with log p ~ -700 on their true class then drove T to
# its upper bound (20), worse ECE for LabelSpreading and the PCA GMM. The backends whose
# probabilities are a network's softmax use SOFTMAX_FLOOR (raysl.backends.CALIBRATION_FLOOR).
FLOOR = 1e-12
# A softmax's log p are its logits up to a per-row constant, and its float32 probabilities go
# down to about 1e-38: at 1e-12 the floor cut the logit gaps of the most confident rows, which
# then all scaled to the same confidence. Measured (`raysl bench backends` probabilities, 10
# labels per class, 3 seeds, calibrated pool ECE at 1e-12 -> 1e-30): gan 0.063 -> 0.037 on
# Fashion-MNIST, 0.018 -> 0.018 on mnist5k; self 0.049 -> 0.044, 0.029 -> 0.029; vae 0.044 ->
# 0.039, 0.021 -> 0.021. The GMM's log-density ratios reach -700: its floor is chosen per fit
# among GMM_FLOORS.
SOFTMAX_FLOOR = 1e-30
# The GMM's floor is chosen per fit by validation NLL (calibrate) among these. A fixed 1e-12
# caps every calibrated confidence (at T = 7, a top class stays below 0.85 with 10 classes):
# on Fashion-MNIST even the temperature fitted on the pool's own labels left ECE 0.06-0.09.
# Measured (10 labels per class, 3 seeds, calibrated pool ECE, 1e-12 alone -> chosen among
# these): Fashion-MNIST embedding k=1 0.097 -> 0.060, k=4 0.081 -> 0.042, inputs' PCA 0.116 ->
# 0.064; mnist5k and digits lower in four of six cells, within 0.001 in the other two.
GMM_FLOORS = (FLOOR, 1e-30, 1e-50)


# Bumped whenever :func:`calibrate` gives other temperatures for the same inputs: it is part of
# the backend's cache key, so probabilities cached by an older version are refitted (2: T
# bounded to [0.5, 10], a degenerate fit keeps T = 1; 3: the floor under log p is the
# backend's, raysl.backends.CALIBRATION_FLOOR; 4: T up to 30, the floor chosen among the
# backend's candidates).
VERSION = 4


def apply_temperature(proba: np.ndarray, t: float, out: np.ndarray | None = None,
                      floor: float = FLOOR) -> np.ndarray:
    """``softmax(log max(proba, floor) / t)``, (n, C) -> (n, C) of ``proba``'s float dtype;
    ``t == 1`` returns the input. ``out``: the array to write (``proba`` itself scales it in
    place, row block by row block: a pool's probabilities are not held twice)."""
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    if t == 1.0:
        return proba
    if out is None:
        dtype = proba.dtype if proba.dtype in (np.float32, np.float64) else np.float64
        out = np.empty(proba.shape, dtype)
    for a in range(0, len(proba), _CHUNK):  # row blocks: no whole-size temporaries
        out[a : a + _CHUNK] = np.exp(log_softmax(
            _log_floor(proba[a : a + _CHUNK], floor) / t, axis=1))
    return out


def _log_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """log max(p, floor) in float64: a float32 array would round a floor below ~1e-45 to 0."""
    return np.log(np.maximum(p.astype(np.float64, copy=False), floor))


_CHUNK = 65536  # rows at a time: a pool of millions needs a few MB of temporaries, not GBs


def nll(proba: np.ndarray, y: np.ndarray, floor: float = FLOOR) -> float:
    """Mean negative log-likelihood of labels ``y`` (n,) under ``proba`` (n, C)."""
    return float(-_log_floor(proba[np.arange(len(y)), y], floor).mean())


def fit_temperature(proba: np.ndarray, y: np.ndarray, lo: float = 0.05,
                    hi: float = 20.0, floor: float = FLOOR) -> float:
    """The T in [lo, hi] minimising the NLL of ``y`` (n,) under ``apply_temperature(proba, T)``
    (a 1-D convex problem in 1/T, solved on log T). 1.0 when there are no rows."""
    if len(y) == 0:
        return 1.0
    logp = _log_floor(proba, floor)

    def objective(log_t: float) -> float:
        lp = log_softmax(logp / np.exp(log_t), axis=1)
        return float(-lp[np.arange(len(y)), y].mean())

    res = minimize_scalar(objective, bounds=(np.log(lo), np.log(hi)), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`calibrate`: ``temperature`` to apply; ``fitted``, the NLL-optimal
    T in the bounds; the validation rows' mean NLL at ``temperature`` (``nll``) and at T = 1
    (``nll_one``); ``n`` rows; ``floor``, the floor under log p it was fitted with (and that
    :func:`apply_temperature` must use)."""

    temperature: float
    fitted: float
    nll: float
    nll_one: float
    n: int
    floor: float = FLOOR

    @property
    def accepted(self) -> bool:
        """False when T = 1 was kept (no rows, or a degenerate fit)."""
        return self.temperature != 1.0


def calibrate(proba: np.ndarray, y: np.ndarray, lo: float = T_MIN, hi: float = T_MAX,
              floor: float | Sequence[float] = FLOOR) -> Calibration:
    """Temperature scaling that does not follow a degenerate fit.

    ``proba`` (n, C) and labels ``y`` (n,) of labeled held-out rows. T is fitted in
    [``lo``, ``hi``]; a fit on the lower bound (within 0.1%) gives T = 1. The NLL at the
    returned T is never above T = 1's (1 is in the bounds, the fallback is 1 itself, and a fit
    that is not better is not taken). ``floor``: the floor under log p (:data:`FLOOR`, or
    :data:`SOFTMAX_FLOOR` for a network's softmax), or several (:data:`GMM_FLOORS`): each is
    fitted and the one with the lowest validation NLL kept (the first on a tie)."""
    if not isinstance(floor, float | int):
        fits = [calibrate(proba, y, lo, hi, float(f)) for f in floor]
        if not fits:
            raise ValueError("calibrate: no floor given")
        return min(fits, key=lambda c: c.nll if np.isfinite(c.nll) else np.inf)
    n = len(y)
    if n == 0:
        return Calibration(1.0, 1.0, float("nan"), float("nan"), 0, floor)
    one = nll(proba, y, floor)
    fitted = fit_temperature(proba, y, lo, hi, floor)
    at_fitted = nll(apply_temperature(proba, fitted, floor=floor), y, floor)
    if fitted <= lo * 1.001 or at_fitted > one:
        return Calibration(1.0, fitted, one, one, n, floor)
    return Calibration(fitted, fitted, at_fitted, one, n, floor)
