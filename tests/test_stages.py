"""The stage dependency table and cache keys: what refits what."""

from __future__ import annotations

import gc
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from raysl import pipeline
from raysl.config import Config, apply_overrides, valid_keys
from raysl.stages import RESOURCE_KEYS, STAGES, cache_key, closure, config_part, depends_on


def test_every_config_key_is_in_a_stage_or_a_resource() -> None:
    """A new config key must be classified: otherwise it changes results without refitting."""
    cfg = Config()
    covered = set()
    for name in ("baseline", "select", "joint"):
        covered |= set(closure(name, cfg))
    for backend in ("gmm", "self", "vae", "gan"):
        c = apply_overrides(cfg, {"backend.name": backend})
        covered |= set(closure("backend", c))
    resources = {k for k in valid_keys() if any(k == r or (r.endswith(".") and k.startswith(r))
                                                 for r in RESOURCE_KEYS)}
    # relabel_rounds is the number of joint stages (out/joint-<r>/), not an input of one
    unclassified = set(valid_keys()) - covered - resources - {"backend.relabel_rounds"}
    assert unclassified == set()
    assert not covered & resources


def test_resource_keys_change_no_stage_key() -> None:
    cfg = Config()
    moved = apply_overrides(cfg, {"train.cpus_per_worker": 1.5, "train.checkpoint_every": 5,
                                  "train.use_gpu": True, "backend.actor_cpus": 1.0,
                                  "ray.address": "auto", "ray.num_cpus": 8,
                                  "ray.enabled": False})
    for stage in STAGES:
        name = stage.partition(":")[0]
        assert config_part(name, cfg) == config_part(name, moved), stage


def test_what_each_stage_depends_on() -> None:
    gmm = apply_overrides(Config(), {"backend.name": "gmm"})
    assert "train.lr" in depends_on("baseline", gmm)
    assert "train.lambda_u" not in depends_on("baseline", gmm)  # the baseline zeroes it
    assert "train.fixmatch_threshold" not in depends_on("baseline", gmm)
    # gmm reads the labeled rows, not the baseline: a learning rate never refits it
    assert not any(k.startswith("train.") for k in closure("backend", gmm))
    assert not any(k.startswith("backend.vae.") for k in closure("backend", gmm))
    # `self` is the baseline's classifier: everything the baseline depends on
    self_ = replace(gmm, backend=replace(gmm.backend, name="self"))
    assert set(closure("baseline", self_)) <= set(closure("backend", self_))
    assert "select.threshold" in closure("joint", gmm)


@pytest.mark.parametrize("name", ["gmm", "vae", "gan"])
def test_a_backend_in_the_embedding_depends_on_the_baseline(name: str) -> None:
    """backend.<name>.features=embedding reads the baseline classifier: a change to the
    baseline refits it; the backend on its inputs stays independent of train.*."""
    plain = {"gmm": "pca"}.get(name, "inputs")
    pca = apply_overrides(Config(), {"backend.name": name, f"backend.{name}.features": plain})
    emb = apply_overrides(pca, {f"backend.{name}.features": "embedding"})
    assert f"backend.{name}.features" in depends_on("backend", pca)
    assert set(closure("baseline", emb)) <= set(closure("backend", emb))
    assert "train.lr" in closure("backend", emb) and "train.lr" not in closure("backend", pca)


def test_cache_key_sees_every_element_of_large_arrays_in_mixed_dicts() -> None:
    """numpy abbreviates str() of large arrays with '...': two different arrays printed the
    same. The key must see every byte, at any depth."""
    a = np.zeros(5000)
    b = a.copy()
    b[2500] = 1.0
    assert str(a) == str(b)  # the trap
    assert cache_key({"x": a, "name": "s"}) != cache_key({"x": b, "name": "s"})
    assert cache_key([{"x": a}]) != cache_key([{"x": b}])
    assert cache_key({"x": a, "name": "s"}) == cache_key({"name": "s", "x": a.copy()})
    assert cache_key(a.astype(np.float32)) != cache_key(a)  # dtype counts
    assert cache_key(a.reshape(50, 100)) != cache_key(a.reshape(100, 50))  # so does shape


@pytest.fixture(scope="module")
def digits_split() -> pipeline.Split:  # type: ignore[name-defined]
    return pipeline.check(apply_overrides(Config(), {"data.n_shards": 2}))


def _fast(**keys: object) -> Config:
    return apply_overrides(Config(), {"ray.enabled": False, "train.epochs": 1,
                                      "train.min_steps": 0, "train.hidden": 16,
                                      "backend.name": "gmm", "backend.gmm.max_iter": 3,
                                      **keys})


def test_resource_settings_reuse_the_baseline(digits_split, tmp_path: Path) -> None:
    first = pipeline.baseline(digits_split, _fast(), tmp_path)
    again = pipeline.baseline(digits_split, _fast(**{"train.cpus_per_worker": 1.0,
                                                     "train.checkpoint_every": 3,
                                                     "train.lambda_u": 0.3}), tmp_path)
    assert not first["cached"] and again["cached"]
    other = pipeline.baseline(digits_split, _fast(**{"train.lr": 0.01}), tmp_path)
    assert not other["cached"]


def test_backend_cache_survives_training_changes(digits_split, tmp_path: Path) -> None:
    pl = pipeline.pseudo_label(digits_split, _fast(), tmp_path, {})
    again = pipeline.pseudo_label(digits_split, _fast(**{"train.lr": 0.01, "train.hidden": 32,
                                                         "backend.actor_cpus": 1.0}),
                                  tmp_path, {})
    assert not pl["cached"] and again["cached"]
    np.testing.assert_array_equal(pl["pool"].gather("conf")[0], again["pool"].gather("conf")[0])


def test_backend_cache_is_written_through_a_closed_file(digits_split, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        pipeline.pseudo_label(digits_split, _fast(), tmp_path, {})
        gc.collect()
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == [], [str(w.message) for w in unclosed]


def test_probabilities_cached_by_another_calibration_version_are_refitted(
        digits_split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to how calibration fits T bumps raysl.calibration.VERSION; a cache written
    before it is not reused (its T would be the old method's)."""
    import raysl.calibration

    first = pipeline.pseudo_label(digits_split, _fast(), tmp_path, {})
    again = pipeline.pseudo_label(digits_split, _fast(), tmp_path, {})
    monkeypatch.setattr(raysl.calibration, "VERSION", raysl.calibration.VERSION + 1)
    newer = pipeline.pseudo_label(digits_split, _fast(), tmp_path, {})
    uncalibrated = _fast(**{"backend.calibrate": False})
    off = pipeline.pseudo_label(digits_split, uncalibrated, tmp_path, {})
    monkeypatch.setattr(raysl.calibration, "VERSION", raysl.calibration.VERSION + 1)
    assert pipeline.pseudo_label(digits_split, uncalibrated, tmp_path, {})["cached"]
    assert not first["cached"] and again["cached"] and not newer["cached"]
    assert not off["cached"]


def test_the_embedding_gmm_is_refitted_for_another_baseline(digits_split,
                                                            tmp_path: Path) -> None:
    cfg = _fast(**{"backend.gmm.features": "embedding", "backend.gmm.pca_dim": 8})
    pipeline.baseline(digits_split, cfg, tmp_path)
    state = pipeline.load_state(tmp_path / "baseline" / "model.pt")
    first = pipeline.pseudo_label(digits_split, cfg, tmp_path, state)
    again = pipeline.pseudo_label(digits_split, cfg, tmp_path, state)
    other = pipeline.pseudo_label(digits_split, cfg, tmp_path,
                                  {k: v * 1.5 for k, v in state.items()})
    assert not first["cached"] and again["cached"] and not other["cached"]
    labels, conf = first["pool"].gather("label", "conf")
    assert not np.allclose(conf, other["pool"].gather("conf")[0])
    assert labels.shape == conf.shape == (len(digits_split.x_u),)
