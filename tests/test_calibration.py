"""Safe temperature scaling (raysl.calibration.calibrate), pure numpy: what it promises on a
handful of validation rows, and that the pipeline calibrates by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raysl.calibration import (
    FLOOR,
    GMM_FLOORS,
    SOFTMAX_FLOOR,
    T_MAX,
    T_MIN,
    apply_temperature,
    calibrate,
    fit_temperature,
    nll,
)
from raysl.metrics import expected_calibration_error


def _model(n: int, c: int = 10, scale: float = 1.5, sharpen: float = 1.0,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) drawn from softmax(logits); the model reports softmax(sharpen · logits)
    (n, C): calibrated at sharpen = 1, overconfident above."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, c)) * scale
    true = np.exp(logits - logits.max(1, keepdims=True))
    true /= true.sum(1, keepdims=True)
    y = (true.cumsum(1) > rng.random((n, 1))).argmax(1)
    reported = np.exp(sharpen * (logits - logits.max(1, keepdims=True)))
    return reported / reported.sum(1, keepdims=True), y


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("sharpen", [0.5, 1.0, 3.0])
def test_calibration_never_makes_validation_nll_worse_than_t_one(seed: int,
                                                                  sharpen: float) -> None:
    proba, y = _model(50, sharpen=sharpen, seed=seed)
    cal = calibrate(proba, y)
    assert T_MIN <= cal.temperature <= T_MAX
    assert nll(apply_temperature(proba, cal.temperature), y) <= nll(proba, y) + 1e-12
    assert cal.nll <= cal.nll_one == pytest.approx(nll(proba, y))


@pytest.mark.parametrize("sharpen", [0.5, 3.0])
def test_a_miscalibrated_model_is_fixed_from_five_rows_per_class(sharpen: float) -> None:
    """50 validation rows (5 per class) undo a model 3x too confident, or 2x too timid:
    measured on a pool of 4,000 fresh rows from the same model."""
    proba, y = _model(50, sharpen=sharpen, seed=1)
    pool, y_pool = _model(4000, sharpen=sharpen, seed=2)
    cal = calibrate(proba, y)
    assert cal.accepted and cal.temperature == pytest.approx(sharpen, rel=0.35)
    before = expected_calibration_error(pool, y_pool)
    after = expected_calibration_error(apply_temperature(pool, cal.temperature), y_pool)
    assert after < before / 2, (before, after)
    assert nll(apply_temperature(pool, cal.temperature), y_pool) < nll(pool, y_pool)


def test_a_lucky_all_correct_validation_set_keeps_t_one() -> None:
    """Every validation row right at confidence 0.9: the NLL falls as T -> 0, so the
    unguarded fit ends on its lower bound (certainty). That is no evidence of how sharp to be:
    T = 1, which keeps a pool that is really 90% right calibrated."""
    n, c = 50, 10
    y = np.arange(n) % c
    proba = np.full((n, c), 0.1 / (c - 1))
    proba[np.arange(n), y] = 0.9
    unguarded = fit_temperature(proba, y, 0.05, 20.0)
    cal = calibrate(proba, y)
    assert unguarded < 0.1
    assert cal.fitted == pytest.approx(T_MIN, rel=1e-3) and cal.temperature == 1.0
    rng = np.random.default_rng(0)  # the pool: argmax right 90% of the time
    y_pool = np.where(rng.random(5000) < 0.9, 0, rng.integers(1, c, 5000))
    pool = np.tile(proba[0], (5000, 1))
    assert expected_calibration_error(pool, y_pool) < 0.01
    assert expected_calibration_error(apply_temperature(pool, unguarded), y_pool) > 0.09


def test_one_wrong_row_gives_an_interior_fit_not_the_floor() -> None:
    """The control for the test above: with one validation row wrong the NLL has an interior
    minimum, and a real sharpening (T < 1) is kept."""
    n, c = 50, 10
    y = np.arange(n) % c
    proba = np.full((n, c), 0.4 / (c - 1))
    proba[np.arange(n), y] = 0.6  # under-confident: right 49 times in 50 at confidence 0.6
    proba[0] = np.roll(proba[0], 1)  # row 0 says class 1 at 0.6; its label 0 gets 1e-4
    proba[0, 0] = 1e-4
    proba[0] /= proba[0].sum()
    cal = calibrate(proba, y)
    assert cal.accepted and T_MIN < cal.temperature < 1.0


def test_no_rows_keep_t_one() -> None:
    proba, y = _model(1)
    assert calibrate(proba[:0], y[:0]).temperature == 1.0


def test_default_config_calibrates_and_reports_ece_before_and_after(tmp_path: Path) -> None:
    """The default backend.calibrate: the cached probabilities are scaled by a T that the
    metrics record, with the pool's ECE with and without it."""
    from raysl import pipeline
    from raysl.config import Config, apply_overrides

    assert Config().backend.calibrate is True
    cfg = apply_overrides(Config(), {"ray.enabled": False, "backend.name": "gmm",
                                     "train.epochs": 1, "train.min_steps": 0,
                                     "train.hidden": 16})
    split = pipeline.check(cfg)
    pl = pipeline.pseudo_label(split, cfg, tmp_path, {})
    t = pl["temperature"]
    assert T_MIN <= t <= T_MAX and t != 1.0  # the GMM is overconfident on digits
    _, m, _ = pipeline.choose_pseudo_labels(split, cfg, pl, 0.0)
    assert m["temperature"] == t
    assert m["ece"] < m["ece_uncalibrated"]
    # a cache hit gives the same temperature and probabilities
    again = pipeline.pseudo_label(split, cfg, tmp_path, {})
    assert again["cached"] and again["temperature"] == t
    for k in ("label", "conf", "label_aligned", "conf_aligned"):
        np.testing.assert_array_equal(again["pool"].gather(k)[0], pl["pool"].gather(k)[0])
    assert again["ece_uncalibrated"] == pl["ece_uncalibrated"] == m["ece_uncalibrated"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_temperature_in_place_and_in_blocks_equals_the_plain_formula(
        dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline scales the pool's probabilities in place, a block of rows at a time: the
    same numbers as softmax(log p / T) on the whole array, in the input's dtype."""
    import raysl.calibration as cal

    monkeypatch.setattr(cal, "_CHUNK", 7)  # several blocks and a ragged last one
    proba, _ = _model(100, sharpen=3.0)
    proba = proba.astype(dtype)
    logp = np.log(np.maximum(proba.astype(np.float64), 1e-12)) / 4.0
    want = np.exp(logp - logp.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    copy = apply_temperature(proba, 4.0)
    assert copy.dtype == dtype and copy is not proba
    same = proba.copy()
    assert apply_temperature(same, 4.0, out=same) is same
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(copy, want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(same, copy)


def test_a_softmax_10x_too_confident_is_undone_only_under_the_softmax_floor() -> None:
    """Logit gaps of 30-60 nats (a softmax 10x too confident, stored as float32): the 1e-12
    floor cuts them, and the scaled pool stays miscalibrated; the softmax floor (1e-30) keeps
    them, and T undoes the sharpening (raysl.backends.CALIBRATION_FLOOR's reason). NLL on
    every seed; ECE over three (T fitted on 50 rows overshoots 10 by 12% on one of them)."""
    ece: dict[float, list[float]] = {FLOOR: [], SOFTMAX_FLOOR: []}
    for seed in range(3):
        proba, y = _model(50, sharpen=10.0, seed=seed)
        pool, y_pool = _model(4000, sharpen=10.0, seed=seed + 10)
        proba, pool = proba.astype(np.float32), pool.astype(np.float32)
        pool_nll = {}
        for floor in (FLOOR, SOFTMAX_FLOOR):
            cal = calibrate(proba, y, floor=floor)
            assert cal.floor == floor
            scaled = apply_temperature(pool, cal.temperature, floor=floor)
            pool_nll[floor] = nll(scaled, y_pool, floor)
            ece[floor].append(expected_calibration_error(scaled, y_pool))
        assert pool_nll[SOFTMAX_FLOOR] < pool_nll[FLOOR]
    assert np.mean(ece[SOFTMAX_FLOOR]) < np.mean(ece[FLOOR])


def test_every_backend_has_a_calibration_floor() -> None:
    from raysl.backends import BACKENDS, CALIBRATION_FLOOR, calibration_floor

    assert set(CALIBRATION_FLOOR) == set(BACKENDS)
    assert calibration_floor("a backend registered elsewhere") == FLOOR
    assert CALIBRATION_FLOOR["gmm"] == GMM_FLOORS  # its log-density ratios reach -700
    assert GMM_FLOORS[0] == FLOOR  # ties keep the first: the floor before the candidates
    assert {CALIBRATION_FLOOR[n] for n in ("self", "vae", "gan")} == {SOFTMAX_FLOOR}


@pytest.mark.parametrize("seed", range(5))
def test_several_floors_keep_the_one_with_the_lowest_validation_nll(seed: int) -> None:
    proba, y = _model(50, sharpen=8.0, seed=seed)
    each = [calibrate(proba, y, floor=f) for f in GMM_FLOORS]
    chosen = calibrate(proba, y, floor=GMM_FLOORS)
    assert chosen == min(each, key=lambda c: c.nll)
    assert chosen.floor in GMM_FLOORS
    assert calibrate(proba, y, floor=(SOFTMAX_FLOOR,)) == calibrate(proba, y,
                                                                     floor=SOFTMAX_FLOOR)
    with pytest.raises(ValueError, match="no floor"):
        calibrate(proba, y, floor=())


@pytest.mark.parametrize("seed", range(3))
def test_log_ratios_of_hundreds_of_nats_are_calibrated_under_a_chosen_floor(seed: int) -> None:
    """A model 25x too confident in float64 (log ratios down to about -300, as the GMM's):
    the 1e-12 floor caps every calibrated confidence and leaves the pool miscalibrated; the
    floor chosen among GMM_FLOORS on 50 validation rows keeps the gaps, and T (above the old
    bound of 10) undoes the sharpening."""
    proba, y = _model(50, sharpen=25.0, seed=seed)
    pool, y_pool = _model(4000, sharpen=25.0, seed=seed + 10)
    fixed = calibrate(proba, y, floor=FLOOR)
    chosen = calibrate(proba, y, floor=GMM_FLOORS)
    assert chosen.floor < FLOOR and chosen.temperature > 10.0
    ece = {c.floor: expected_calibration_error(
        apply_temperature(pool, c.temperature, floor=c.floor), y_pool) for c in (fixed, chosen)}
    assert ece[chosen.floor] < 0.8 * ece[FLOOR], ece
