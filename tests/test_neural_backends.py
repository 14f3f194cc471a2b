"""The neural backends (vae, gan) under FedAvg, and temperature scaling, without Ray.

Invariants: one shard is plain local training; a seed fixes the fit; shard_stats is pure;
FedAvg is a size-weighted mean; predictions are distributions; temperature scaling fixes an
over-confident model and T = 1 changes nothing; and a tiny fit learns something.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from raysl.backends import BACKENDS, FitContext
from raysl.backends.base import FitResult, LocalExecutor, Shard, ShardWorker, fit
from raysl.backends.fedavg import (
    FedAvgBackend,
    fedavg,
    lr_factor,
    pack,
    seed_of,
    single_thread,
    train_local,
)
from raysl.calibration import apply_temperature, fit_temperature, nll
from raysl.config import (
    BackendConfig,
    Config,
    DataConfig,
    GANConfig,
    VAEConfig,
    apply_overrides,
)
from raysl.data import Split, load_dataset, make_split, shard
from raysl.errors import ConfigError

# Tiny networks and few steps: each fit below takes well under a second or two. On the inputs
# (the classifier's embedding: _fit_embedding).
TINY = BackendConfig(
    vae=VAEConfig(rounds=2, local_epochs=1, batch_size=32, labeled_batch_size=16, hidden=32,
                  latent_dim=4, m1_dim=8, features="inputs"),
    gan=GANConfig(rounds=2, local_epochs=1, batch_size=32, labeled_batch_size=16, hidden=32,
                  noise_dim=8, features="inputs"),
)
NEURAL = ["vae", "gan"]


@pytest.fixture(scope="module")
def split() -> Split:
    cfg = DataConfig(labels_per_class=5)
    return make_split(load_dataset(cfg), cfg)


def _small(sp: Split, n_u: int = 160) -> Split:
    """The split with fewer unlabeled rows (speed)."""
    return replace(sp, x_u=sp.x_u[:n_u], y_u=sp.y_u[:n_u])


def _flat(sp: Split) -> Split:
    """The same rows as (n, 64) vectors: the MLP architectures."""
    return replace(sp, x_l=sp.x_l.reshape(len(sp.x_l), -1), x_u=sp.x_u.reshape(len(sp.x_u), -1),
                   x_val=sp.x_val.reshape(len(sp.x_val), -1))


def _fit(name: str, sp: Split, cfg: BackendConfig = TINY, n_shards: int = 2,
         seed: int = 0) -> tuple[FitResult, FedAvgBackend]:
    factory = BACKENDS[name]
    ctx = FitContext(sp.n_classes, sp.input_shape, seed=seed)
    workers = [ShardWorker(factory, cfg, ctx, Shard(x, sp.x_l, sp.y_l, i))
               for i, x in enumerate(shard(sp.x_u, n_shards))]
    res = fit(factory(cfg, ctx), LocalExecutor(workers), sp.x_l, sp.y_l)
    backend = factory(cfg, ctx)
    backend.load_state_dict(res.state)
    assert isinstance(backend, FedAvgBackend)
    return res, backend


# -- FedAvg --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEURAL)
def test_one_shard_fedavg_equals_plain_local_training(split: Split, name: str) -> None:
    """With one shard, rounds of (send state, train locally, average) are exactly one model
    and one optimiser trained continuously with the same per-round batches and noise."""
    sp = _small(split)
    res, _ = _fit(name, sp, n_shards=1)
    assert res.rounds == 2

    plain = BACKENDS[name](TINY, FitContext(sp.n_classes, sp.input_shape, seed=0))
    assert isinstance(plain, FedAvgBackend)
    trainer = plain.trainer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(0))
        model = trainer.build()
    opts = trainer.optimizers(model)
    one = Shard(sp.x_u, sp.x_l, sp.y_l, 0)
    with single_thread():  # as the shard workers train (thread count changes float sums)
        for rnd in range(2):
            train_local(trainer, model, opts, one, plain.sched, 0, rnd)
    expected = pack(model, opts)
    got = res.state["arrays"]
    assert expected.keys() == got.keys()
    assert any(k.startswith("opt") for k in got)  # the optimiser moments travel too
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_fedavg_is_a_size_weighted_mean() -> None:
    a = {"w": np.array([0.0, 2.0], np.float32), "n": np.array(0, np.int64)}
    b = {"w": np.array([4.0, 2.0], np.float32), "n": np.array(4, np.int64)}
    out = fedavg([a, b], [1, 3])
    np.testing.assert_allclose(out["w"], [3.0, 2.0])
    assert out["w"].dtype == np.float32
    assert out["n"] == 3 and out["n"].dtype == np.int64  # integer buffers are rounded


def test_learning_rate_is_constant_then_decays_linearly() -> None:
    f = [lr_factor(r, 10) for r in range(10)]
    assert f[:6] == [1.0] * 6  # the first half at the base rate
    assert all(a > b > 0 for a, b in itertools.pairwise(f[5:]))
    assert f[-1] == pytest.approx(0.2)


def test_fedavg_of_identical_weights_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    w = {"w": rng.standard_normal((5, 7)).astype(np.float32)}
    for sizes in ([1], [3, 3, 3], [1, 5, 2]):
        out = fedavg([copy.deepcopy(w) for _ in sizes], sizes)
        np.testing.assert_array_equal(out["w"], w["w"])


@pytest.mark.parametrize("name", NEURAL)
def test_shard_stats_does_not_mutate_the_backend(split: Split, name: str) -> None:
    sp = _small(split, 64)
    backend = BACKENDS[name](TINY, FitContext(sp.n_classes, sp.input_shape, seed=0))
    backend.init(sp.x_l, sp.y_l)
    before = copy.deepcopy(backend.state_dict())
    p_before = backend.predict_proba(sp.x_u)
    arrays, n, loss = backend.shard_stats(Shard(sp.x_u, sp.x_l, sp.y_l, 0))
    assert n == len(sp.x_u) and np.isfinite(loss)
    after = backend.state_dict()
    assert after["round"] == before["round"]
    for k, v in before["arrays"].items():
        np.testing.assert_array_equal(after["arrays"][k], v, err_msg=k)
    np.testing.assert_array_equal(backend.predict_proba(sp.x_u), p_before)
    # and the shard's training did change the weights it returned
    assert any(not np.array_equal(arrays[k], v) for k, v in before["arrays"].items())


# -- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEURAL)
def test_same_seed_same_probabilities_other_seed_different(split: Split, name: str) -> None:
    sp = _small(split)
    a, _ = _fit(name, sp, seed=0)
    b, _ = _fit(name, sp, seed=0)
    c, _ = _fit(name, sp, seed=1)
    np.testing.assert_array_equal(a.proba, b.proba)
    np.testing.assert_array_equal(a.objective, b.objective)
    assert np.abs(a.proba - c.proba).max() > 1e-3


# -- predictions ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["image", "vector"])
@pytest.mark.parametrize("name", NEURAL)
def test_predict_proba_rows_are_distributions(split: Split, name: str, shape: str) -> None:
    sp = _small(split, 128) if shape == "image" else _flat(_small(split, 128))
    res, backend = _fit(name, sp, replace(TINY, vae=replace(TINY.vae, rounds=1),
                                          gan=replace(TINY.gan, rounds=1)))
    assert res.proba.shape == (len(sp.x_u), sp.n_classes)
    for x in (sp.x_u, sp.x_val, sp.x_u[:1]):
        p = backend.predict_proba(x)
        assert p.shape == (len(x), sp.n_classes)
        assert np.all(p >= 0)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    # rows are labeled independently of their batch (no batch norm in the labeler)
    np.testing.assert_allclose(backend.predict_proba(sp.x_u[:7])[3], res.proba[3], atol=1e-6)


def _small_fit() -> BackendConfig:
    """A few rounds of small networks on the inputs: seconds per fit."""
    return BackendConfig(vae=VAEConfig(rounds=3, local_epochs=3, batch_size=32, hidden=64,
                                       m1_dim=0, features="inputs"),
                         gan=GANConfig(rounds=3, local_epochs=3, batch_size=32, hidden=64,
                                       features="inputs"))


@pytest.mark.parametrize("name", NEURAL)
def test_a_small_fit_beats_chance_on_digits(split: Split, name: str) -> None:
    cfg = _small_fit()
    sp = _small(split, 600)
    res, _ = _fit(name, sp, cfg)
    acc = float((res.proba.argmax(1) == sp.y_u).mean())
    assert acc > 0.4, acc  # chance is 0.1


def test_config_keys_and_limits() -> None:
    cfg = apply_overrides(Config(), {"backend.vae.rounds": "3", "backend.gan.lr": 0.01,
                                     "backend.calibrate": "true"})
    assert cfg.backend.vae.rounds == 3 and cfg.backend.gan.lr == 0.01 and cfg.backend.calibrate
    with pytest.raises(ConfigError, match=r"backend\.vae\.rounds"):
        apply_overrides(Config(), {"backend.vae.rounds": 0})
    with pytest.raises(ConfigError, match=r"backend\.gan\.latent_dim"):
        apply_overrides(Config(), {"backend.gan.latent_dim": 3})


# -- temperature scaling -------------------------------------------------------------------


def _overconfident(n: int = 3000, c: int = 5, sharpen: float = 3.0):
    """Labels drawn from softmax(logits); the model reports softmax(sharpen · logits)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, c)) * 2.0
    true = np.exp(logits - logits.max(1, keepdims=True))
    true /= true.sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=p) for p in true])
    sharp = np.exp(sharpen * (logits - logits.max(1, keepdims=True)))
    return sharp / sharp.sum(1, keepdims=True), y


def test_temperature_scaling_fixes_an_overconfident_model() -> None:
    proba, y = _overconfident()
    t = fit_temperature(proba, y)
    assert t == pytest.approx(3.0, rel=0.1)  # it undoes the sharpening
    scaled = apply_temperature(proba, t)
    assert nll(scaled, y) < nll(proba, y) - 0.1
    np.testing.assert_array_equal(scaled.argmax(1), proba.argmax(1))  # labels unchanged
    np.testing.assert_allclose(scaled.sum(1), 1.0)


def test_temperature_one_is_the_identity() -> None:
    proba, _ = _overconfident(50)
    np.testing.assert_array_equal(apply_temperature(proba, 1.0), proba)
    np.testing.assert_allclose(apply_temperature(proba, 1.0 + 1e-12), proba, atol=1e-9)
    with pytest.raises(ValueError):
        apply_temperature(proba, 0.0)


def test_pipeline_calibrate_keeps_labels_and_changes_confidences(
        split: Split, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from raysl.pipeline import pseudo_label

    base = apply_overrides(Config(), {"backend.name": "gmm", "backend.gmm.max_iter": 5,
                                      "backend.calibrate": False})
    cal = apply_overrides(base, {"backend.calibrate": True})
    plain = pseudo_label(split, base, tmp_path, {}, use_ray=False)
    with caplog.at_level("INFO", logger="raysl"):
        scaled = pseudo_label(split, cal, tmp_path, {}, use_ray=False)
    assert plain["key"] != scaled["key"]  # cached separately
    assert "T=" in caplog.text
    (plain_labels, plain_conf), (labels, conf) = (
        r["pool"].gather("label", "conf") for r in (plain, scaled))
    np.testing.assert_array_equal(plain_labels, labels)
    assert not np.allclose(plain_conf, conf)


def test_fedavg_over_four_shards_costs_the_vae_no_accuracy(one_torch_thread: None) -> None:
    """Issue 15: FedAvg rounds over shards cost no accuracy against one-shard training. The VAE
    (M2 on digits as 64-d vectors, 10 labels per class, 1,288 pool rows) at the default
    schedule of 20 rounds × 2 local epochs: 4 shards within 2 points of 1 shard (measured:
    seed 0 91.7% vs 91.9%, seed 1 91.1% vs 92.0%). Fewer rounds do cost: at 4 rounds × 2
    epochs, 4 shards scored 78–83% against 90% (each round is a quarter of the sequential
    steps)."""
    cfg = DataConfig(labels_per_class=10)
    sp = _flat(make_split(load_dataset(cfg), cfg))
    vae = BackendConfig(vae=VAEConfig(rounds=20, local_epochs=2, hidden=64, m1_dim=0,
                                      latent_dim=8, features="inputs"))
    acc = {n: float((_fit("vae", sp, vae, n_shards=n)[0].proba.argmax(1) == sp.y_u).mean())
           for n in (1, 4)}
    assert acc[1] > 0.85, acc  # a real fit (LabelSpreading: 94.9% on digits)
    assert acc[4] >= acc[1] - 0.02, acc


# -- in the baseline classifier's embedding (features="embedding") --------------------------


@pytest.fixture(scope="module")
def classifier_state(split: Split) -> dict[str, np.ndarray]:
    """A classifier (hidden width 32) trained for 200 steps on the labeled rows: its
    penultimate layer is the feature space."""
    from raysl.config import TrainConfig
    from raysl.train import TrainData, fit_classifier

    cfg = TrainConfig(epochs=2, min_steps=200, hidden=32, fixmatch=False, lambda_u=0.0)
    data = TrainData(split.x_l, split.y_l, split.x_l[:0], split.y_l[:0], np.zeros(0, np.float32),
                     split.x_val, split.y_val, len(split.x_u))
    with single_thread():
        return fit_classifier(data, cfg, split.input_shape, split.n_classes).state


def _in_embedding(cfg: BackendConfig) -> BackendConfig:
    return replace(cfg, vae=replace(cfg.vae, features="embedding"),
                   gan=replace(cfg.gan, features="embedding"))


def _fit_embedding(name: str, sp: Split, state: dict[str, np.ndarray], cfg: BackendConfig,
                   n_shards: int = 2) -> tuple[FitResult, FedAvgBackend]:
    factory = BACKENDS[name]
    cfg = _in_embedding(cfg)
    ctx = FitContext(sp.n_classes, sp.input_shape, seed=0, hidden=32, classifier_state=state)
    workers = [ShardWorker(factory, cfg, ctx, Shard(x, sp.x_l, sp.y_l, i))
               for i, x in enumerate(shard(sp.x_u, n_shards))]
    res = fit(factory(cfg, ctx), LocalExecutor(workers), sp.x_l, sp.y_l)
    backend = factory(cfg, ctx)  # a fresh labeler: the state carries everything it needs
    backend.load_state_dict(res.state)
    assert isinstance(backend, FedAvgBackend)
    return res, backend


def test_needs_classifier_follows_the_feature_space() -> None:
    from raysl.backends import needs_classifier

    for name in ("gmm", "vae", "gan"):
        plain = BackendConfig(name=name, vae=VAEConfig(features="inputs"),
                              gan=GANConfig(features="inputs"))
        assert not needs_classifier(plain), name
        assert needs_classifier(replace(_in_embedding(plain), gmm=replace(
            plain.gmm, features="embedding"))), name
    assert needs_classifier(BackendConfig(name="self"))
    with pytest.raises(ConfigError, match=r"backend\.vae\.features"):
        apply_overrides(Config(), {"backend.vae.features": "pca"})


@pytest.mark.parametrize("name", NEURAL)
def test_embedding_features_need_the_classifier(split: Split, name: str) -> None:
    with pytest.raises(ValueError, match=rf"backend\.{name}\.features='embedding'.*classifier"):
        BACKENDS[name](_in_embedding(TINY), FitContext(split.n_classes, split.input_shape, 0))


@pytest.mark.parametrize("name", NEURAL)
def test_embedding_features_model_the_classifier_embedding(
        split: Split, classifier_state: dict[str, np.ndarray], name: str) -> None:
    """The networks are built for the embedding's width (32), not the 8×8 images; the
    standardization is fixed from the labeled rows and travels in the state, so a fresh
    labeler predicts what the workers did; rows are labeled independently of their batch."""
    sp = _small(split, 200)
    res, backend = _fit_embedding(name, sp, classifier_state, TINY)
    from raysl.backends.nets import ClassifierEmbedding

    emb = ClassifierEmbedding(FitContext(sp.n_classes, sp.input_shape, 0, 32,
                                         classifier_state), "test")
    f_l = emb(sp.x_l)
    np.testing.assert_allclose(res.state["shift"], f_l.mean(0))
    assert res.state["shift"].shape == (32,) and res.state["scale"] > 0
    weights = [v for k, v in res.state["arrays"].items() if k.startswith("model.")]
    assert any(w.ndim == 2 and w.shape[1] == 32 for w in weights)  # a layer reads 32 columns
    assert not any(w.ndim == 4 for w in weights)  # vectors: no convolution over the images
    np.testing.assert_allclose(backend.predict_proba(sp.x_u), res.proba, atol=1e-6)
    p = backend.predict_proba(sp.x_val)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(backend.predict_proba(sp.x_val[3:4])[0], p[3], atol=1e-6)


@pytest.mark.parametrize(("name", "n_splits"), [("vae", 5), ("gan", 3)])
def test_a_small_fit_in_the_embedding_beats_the_same_fit_on_the_inputs(
        digits_splits: list[tuple[Split, dict[str, np.ndarray]]], name: str,
        n_splits: int) -> None:
    """On the mean of several splits (600 pool rows each): one split does not separate the
    VAE's two feature spaces (measured on seeds 0-4: inputs 0.77-0.82, embedding 0.77-0.85);
    the GAN's gap is wider (inputs 0.46-0.59, embedding 0.78-0.84), so 3 splits do."""
    cfg = _small_fit()
    acc = []
    for full, state in digits_splits[:n_splits]:
        sp = _small(full, 600)
        with single_thread():
            inputs, _ = _fit(name, sp, cfg)
            embedded, _ = _fit_embedding(name, sp, state, cfg)
        acc.append([float((r.proba.argmax(1) == sp.y_u).mean()) for r in (inputs, embedded)])
    mean = np.mean(acc, axis=0)
    assert mean[1] > max(mean[0], 0.78), acc
