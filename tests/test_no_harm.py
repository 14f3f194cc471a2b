"""Do no harm: standardized inputs saved with the model, backends judged on validation rows,
class-balanced selection, the guard, ``backend.name=auto`` and the final model choice."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from raysl.backends import BACKENDS
from raysl.backends.base import FitContext, Shard
from raysl.config import Config, apply_overrides
from raysl.data import DATASETS, Dataset, make_split
from raysl.preprocess import Moments, Standardizer, standardize_split
from raysl.select import align_to_prior, class_prior, per_class_k, select, total_variation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tabular(n: int = 600, seed: int = 0) -> Dataset:
    """Two well-separated classes in 5 columns on wildly different scales (one constant)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = rng.standard_normal((n, 5)) + 3.0 * y[:, None]
    scales = np.array([1e4, 1.0, 1e-3, 250.0, 0.0])
    x = (z * scales + np.array([5e4, -2.0, 0.0, 10.0, 7.0])).astype(np.float32)
    return Dataset("tab", x, y.astype(np.int64), 2)


def _split(n_shards: int = 2, **data: Any) -> Any:
    cfg = apply_overrides(Config(), {"data.labels_per_class": 10, "data.n_shards": n_shards,
                                     **{f"data.{k}": v for k, v in data.items()}})
    return make_split(_tabular(), cfg.data), cfg


# -- standardization ------------------------------------------------------------------------


def test_moments_merge_exactly_whatever_the_sharding() -> None:
    x = np.random.default_rng(1).standard_normal((1000, 7)) * 1e3 + 5e5
    whole = Standardizer.fit([x])
    for k in (2, 3, 7):
        parts = Standardizer.fit(np.array_split(x, k))
        np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-6)
        np.testing.assert_allclose(parts.scale, whole.scale, rtol=1e-5)
    np.testing.assert_allclose(whole.mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(whole.scale, x.std(0), rtol=1e-5)
    empty = Moments.of(x[:0])
    assert (empty + Moments.of(x)).n == 1000


def test_moments_are_taken_in_blocks_of_rows_and_equal_one_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Moments.of reads its rows a block at a time (a float64 copy of a block, not of all the
    rows): the same bits as merging the blocks' moments in order, what the rows held in Ray's
    object store give (RemoteRows.blocks), and one pass's figures up to rounding."""
    import raysl.preprocess as pre

    x = np.random.default_rng(2).standard_normal((23, 3, 2)).astype(np.float32) * 50 + 1e3
    one = Moments.of(x)  # 23 rows: one block
    flat = x.reshape(23, -1).astype(np.float64)
    np.testing.assert_array_equal(one.mean, flat.mean(0))
    np.testing.assert_array_equal(one.m2, ((flat - flat.mean(0)) ** 2).sum(0))
    monkeypatch.setattr(pre, "MOMENT_ROWS", 5)
    blocked = Moments.of(x)
    merged = Moments.of_blocks((x[a : a + 5] for a in range(0, 23, 5)), 6)
    assert blocked.n == merged.n == 23
    np.testing.assert_array_equal(blocked.mean, merged.mean)
    np.testing.assert_array_equal(blocked.m2, merged.m2)
    np.testing.assert_allclose(blocked.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(blocked.m2, one.m2, rtol=1e-9)
    none = Moments.of_blocks(iter([]), 6)  # an empty shard: no rows, zeros
    assert none.n == 0 and none.mean.shape == none.m2.shape == (6,) and not none.m2.any()


def test_one_shard_and_many_give_the_same_transform() -> None:
    one, _ = _split(n_shards=1)
    many, _ = _split(n_shards=5)
    a, b = standardize_split(one, 1), standardize_split(many, 5)
    assert a.standardizer is not None and b.standardizer is not None
    np.testing.assert_allclose(a.standardizer.mean, b.standardizer.mean, rtol=1e-5)
    np.testing.assert_allclose(a.x_u, b.x_u, atol=1e-4)


def test_standardized_split_has_unit_columns_and_constant_ones_stay_finite() -> None:
    split, _ = _split()
    st = standardize_split(split, 2)
    train = np.concatenate([st.x_l, st.x_u])
    assert np.all(np.isfinite(train)) and np.all(np.isfinite(st.x_test))
    np.testing.assert_allclose(train[:, :4].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train[:, :4].std(0), 1, atol=1e-3)
    assert st.standardizer is not None and st.standardizer.scale[4] == 1.0  # constant column
    np.testing.assert_array_equal(train[:, 4], 0)
    assert st.key != split.key  # caches of the raw and standardized runs never mix
    assert standardize_split(st, 2) is st  # idempotent


def test_images_are_not_standardized() -> None:
    cfg = apply_overrides(Config(), {})
    split = make_split(DATASETS["digits"](cfg.data), cfg.data)
    assert standardize_split(split, 2) is split
    assert split.x_l.min() >= 0 and split.x_l.max() <= 1


def test_saved_model_carries_the_standardization_and_predicts_raw_inputs(
        tmp_path: Path) -> None:
    from raysl.models import build_model
    from raysl.pipeline import _save_model, load_model
    from raysl.train import predict_proba, state_to_numpy

    raw, cfg = _split()
    split = standardize_split(raw, 2)
    torch.manual_seed(0)
    net = build_model(split.input_shape, split.n_classes, cfg.train.hidden)
    _save_model(tmp_path / "model.pt", state_to_numpy(net.state_dict()), split, cfg)
    loaded = load_model(tmp_path / "model.pt")
    # the loaded module on RAW rows == the trained network on standardized rows
    np.testing.assert_allclose(predict_proba(loaded, raw.x_test),
                               predict_proba(net, split.x_test), atol=1e-5)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(saved["preprocess"]) == {"mean", "scale"}


# -- selection ------------------------------------------------------------------------------


def test_per_class_selection_keeps_the_prior_proportions() -> None:
    rng = np.random.default_rng(0)
    n, c = 3000, 3
    logits = rng.standard_normal((n, c))
    logits[:, 0] += 2.0  # a backend biased toward class 0
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    prior = np.array([0.2, 0.3, 0.5])
    sel = select(proba, "per_class", prior=prior, share=0.1)
    kept = np.array(sel.per_class(c))
    np.testing.assert_array_equal(kept, per_class_k(prior, n, 0.1))  # every class has enough
    assert total_variation(kept / kept.sum(), prior) < 0.01
    # class 2 is predicted for fewer rows than its quota: all classes scale down alike
    have = np.bincount(sel.labels, minlength=c)
    scarce = select(proba, "per_class", prior=prior, share=0.5)
    kept = np.array(scarce.per_class(c))
    assert kept[2] == have[2] < per_class_k(prior, n, 0.5)[2]
    assert total_variation(kept / kept.sum(), prior) < 0.01
    # within a class, the kept rows are its most confident ones
    for k in range(c):
        rows = sel.labels == k
        assert sel.conf[rows & sel.mask].min() >= sel.conf[rows & ~sel.mask].max()
    biased = select(proba, "threshold", threshold=0.5)
    assert total_variation(np.array(biased.per_class(c)) / biased.mask.sum(), prior) > 0.3


def test_alignment_moves_the_mean_prediction_to_the_prior() -> None:
    rng = np.random.default_rng(2)
    proba = rng.dirichlet([5.0, 1.0, 1.0], size=2000)
    prior = np.array([1 / 3, 1 / 3, 1 / 3])
    aligned = align_to_prior(proba, prior)
    np.testing.assert_allclose(aligned.sum(1), 1.0)
    assert total_variation(aligned.mean(0), prior) < total_variation(proba.mean(0), prior) / 2
    assert class_prior(np.array([0, 0, 1, -1]), 3).tolist() == [2 / 3, 1 / 3, 0.0]


# -- toy backends: a nearest-class-mean labeler, honest or with shuffled labels -------------


class CentroidBackend:
    """Softmax over negative distances to the labeled class means; ``shift`` relabels class c
    as c + shift (mod C): a confident backend whose labels are wrong (shuffled)."""

    def __init__(self, ctx: FitContext, shift: int = 0) -> None:
        self.ctx, self.shift, self.means = ctx, shift, np.zeros(0)

    def init(self, x_l: np.ndarray, y_l: np.ndarray) -> None:
        flat = x_l.reshape(len(x_l), -1)
        self.means = np.stack([flat[y_l == c].mean(0) for c in range(self.ctx.n_classes)])

    @property
    def converged(self) -> bool:
        return True

    def shard_stats(self, shard: Shard) -> Any:
        return None

    def merge(self, stats: Sequence[Any]) -> float:
        return 0.0

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        d = ((x.reshape(len(x), -1)[:, None] - self.means[None]) ** 2).sum(-1)
        logits = -d / d.mean()
        p = np.exp(20 * (logits - logits.max(1, keepdims=True)))
        p /= p.sum(1, keepdims=True)
        return np.roll(p, self.shift, axis=1)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means = state["means"]


def _honest(cfg: Any, ctx: FitContext) -> CentroidBackend:
    return CentroidBackend(ctx)


def _shuffled(cfg: Any, ctx: FitContext) -> CentroidBackend:
    return CentroidBackend(ctx, shift=1)


@pytest.fixture
def toy_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.cloudpickle

    monkeypatch.setitem(BACKENDS, "honest", _honest)
    monkeypatch.setitem(BACKENDS, "shuffled", _shuffled)
    # Ray workers can't import this test module: ship its toy classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_every_backend_is_judged_on_the_validation_rows(toy_backends: None,
                                                       tmp_path: Path) -> None:
    from raysl.pipeline import pseudo_label

    split, cfg = _split()
    split = standardize_split(split, 2)
    for name, good in (("honest", True), ("shuffled", False)):
        c = replace(cfg, backend=replace(cfg.backend, name=name))
        pl = pseudo_label(split, c, tmp_path, {}, use_ray=False)
        assert pl["val_proba"].shape == (len(split.y_val), 2)
        assert (pl["val_accuracy"] > 0.9) is good
        assert 0 <= pl["val_ece"] <= 1
        again = pseudo_label(split, c, tmp_path, {}, use_ray=False)
        assert again["cached"] and again["val_accuracy"] == pl["val_accuracy"]


def test_auto_keeps_the_backend_with_the_best_validation_accuracy(
        toy_backends: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import raysl.pipeline as pipeline

    split, cfg = _split()
    split = standardize_split(split, 2)
    for order in (("shuffled", "honest"), ("honest", "shuffled")):
        monkeypatch.setattr(pipeline, "AUTO_BACKENDS", order)
        pl = pipeline.pseudo_label(split, cfg, tmp_path, {}, use_ray=False)
        assert cfg.backend.name == "auto" and pl["backend"] == "honest"
        assert [r["backend"] for r in pl["ranked"]] == ["honest", "shuffled"]


def test_the_guard_rejects_a_shuffled_backend_and_falls_back_to_the_next(
        toy_backends: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import raysl.pipeline as pipeline
    from raysl.columns import split_columns

    split, cfg = _split()
    split = standardize_split(split, 2)
    # uncalibrated: the guard alone must stop it (calibration would flatten its confidences
    # below the threshold by itself: see the end of this test)
    bad = replace(cfg, backend=replace(cfg.backend, name="shuffled", calibrate=False))
    pl = pipeline.pseudo_label(split, bad, tmp_path, {}, use_ray=False)
    with caplog.at_level("WARNING", logger="raysl"):
        sel, m, guard = pipeline.choose_pseudo_labels(split, bad, pl, baseline_val_accuracy=0.9)
    assert guard["tripped"] and not sel.gather().mask.any() and m["n_selected"] == 0
    assert "shuffled: validation accuracy" in guard["message"]
    assert "pseudo-labels not used" in caplog.text
    off = apply_overrides(bad, {"select.guard": False})
    sel, _, guard = pipeline.choose_pseudo_labels(split, off, pl, baseline_val_accuracy=0.9)
    assert not guard["tripped"] and sel.gather().mask.any()
    # auto: the best candidate trips (its kept labels are all one class), the next is used
    n_u = len(split.x_u)
    one_class = {"label": np.zeros(n_u, np.int64), "conf": np.full(n_u, 0.99, np.float32)}
    lopsided = {**pl, "backend": "lopsided", "val_accuracy": 1.0,
                "pool": split_columns(split.idx_u, split.y_u, [(0, n_u)]).join([one_class])}
    honest = pipeline.pseudo_label(split, replace(cfg, backend=replace(cfg.backend,
                                                                       name="honest")),
                                   tmp_path, {}, use_ray=False)
    auto = {**lopsided, "ranked": [lopsided, honest]}
    sel, m, guard = pipeline.choose_pseudo_labels(split, cfg, auto, 0.9)
    assert guard["used"] == "honest" and "lopsided: the kept labels" in guard["rejected"][0]
    assert m["backend"] == "honest" and m["tv_distance"] < 0.25
    # calibrated (the default), the shuffled backend's confidences fall below the threshold:
    # wrong on every validation row, its temperature goes to the upper bound
    cal = replace(bad, backend=replace(bad.backend, calibrate=True))
    assert cfg.backend.calibrate
    pl = pipeline.pseudo_label(split, cal, tmp_path, {}, use_ray=False)
    sel, _, _ = pipeline.choose_pseudo_labels(split, replace(off, backend=cal.backend), pl, 0.9)
    assert pl["temperature"] > 5 and not sel.gather().mask.any()


def test_final_choice_prefers_the_joint_model_unless_the_baseline_is_better() -> None:
    from raysl.pipeline import final_choice

    base = {"val_accuracy": 0.8, "test_accuracy": 0.7}
    assert final_choice(base, {"val_accuracy": 0.8, "test_accuracy": 0.9},
                        "joint")["model"] == "joint"
    worse = final_choice(base, {"val_accuracy": 0.6, "test_accuracy": 0.5}, "joint")
    assert worse["model"] == "baseline" and worse["test_accuracy"] == 0.7
    assert "baseline scored higher" in worse["reason"]
    assert final_choice(None, {"val_accuracy": 0.1, "test_accuracy": 0.1},
                        "joint")["model"] == "joint"


@pytest.mark.ray
def test_a_shuffled_backend_never_reaches_the_final_model(
        ray_session: None, toy_backends: None, tmp_path: Path,
        tiny_config: Config) -> None:
    """End to end on a user's unscaled .npz: with the guard, the shuffled labels are dropped;
    without it they wreck the joint model, and the final model.pt is then the baseline."""
    from raysl import pipeline

    ds = _tabular()
    path = tmp_path / "user.npz"
    np.savez(path, x=ds.x, y=ds.y)
    base = apply_overrides(tiny_config, {
        "data.dataset": str(path), "data.labels_per_class": 10, "backend.name": "shuffled",
        "train.num_workers": 0, "train.fixmatch": False, "train.ema": 0.0,
        "train.min_steps": 150, "select.threshold": 0.0})
    guarded = pipeline.run(base, tmp_path / "guarded")
    assert guarded["guard"]["tripped"]
    assert guarded["pseudo_labels"]["n_selected"] == 0
    assert guarded["baseline"]["test_accuracy"] > 0.9  # standardized: no hand-tuning needed
    assert guarded["pseudo_labels"]["val_accuracy"] < 0.2

    unguarded = pipeline.run(apply_overrides(base, {"select.guard": False}),
                             tmp_path / "unguarded")
    assert not unguarded["guard"]["tripped"]
    assert unguarded["joint"]["val_accuracy"] < unguarded["baseline"]["val_accuracy"]
    assert unguarded["final"]["model"] == "baseline"
    out = tmp_path / "unguarded"
    assert (out / "model.pt").read_bytes() == (out / "baseline" / "model.pt").read_bytes()
    assert (out / "joint" / "model.pt").is_file()  # both models stay in out/
    written = json.loads((out / "metrics.json").read_text())
    assert written["final"]["model"] == "baseline"
    assert {"val_accuracy", "val_ece", "tv_distance"} <= set(written["pseudo_labels"])
    assert "val_ece" in written["baseline"]
