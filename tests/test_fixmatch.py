"""Online pseudo-labels: augmentations, FixMatch's loss, adaptive thresholds, distribution
alignment, the EMA teacher, and their invariants inside :func:`raysl.train.run_epoch`."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysl import augment
from raysl.config import TrainConfig
from raysl.losses import (
    align_distribution,
    apply_prior,
    fixmatch_loss,
    flexmatch_thresholds,
    freematch_thresholds,
    freematch_update,
    label_prior,
)
from raysl.models import build_model
from raysl.objectives import init_ssl_state, offline_weight
from raysl.train import (
    TrainData,
    ema_decay,
    ema_update,
    make_optimizer,
    run_epoch,
    steps_per_epoch,
)

C = 3
SHAPE = (1, 8, 8)
CFG = TrainConfig(epochs=2, batch_size=8, mu=2, lr=0.05, hidden=16, num_workers=0, seed=0,
                  fixmatch=True, fixmatch_threshold=0.34, ema=0.0, init="torch", min_steps=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**kw: object) -> TrainConfig:
    return dataclasses.replace(CFG, **kw)


def _data(n_l: int = 24, n_p: int = 20, n_u: int = 64, seed: int = 0,
          with_u: bool = True) -> TrainData:
    rng = np.random.default_rng(seed)

    def x(n: int) -> np.ndarray:
        return rng.random((n, *SHAPE)).astype(np.float32)

    x_u = x(n_u)
    return TrainData(x(n_l), rng.integers(0, C, n_l), x(n_p), rng.integers(0, C, n_p),
                     rng.uniform(0.5, 1, n_p).astype(np.float32), x(6), rng.integers(0, C, 6),
                     n_u, x_u=x_u if with_u else None,
                     y_u=rng.integers(0, C, n_u) if with_u else None)


def _model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(SHAPE, C, 16)


def _params(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _train(data: TrainData, cfg: TrainConfig, teacher: bool = False
           ) -> tuple[nn.Module, nn.Module | None, list[dict[str, float]]]:
    model = _model()
    t = copy.deepcopy(model) if teacher else None
    opt = make_optimizer(model, cfg)
    state: dict[str, Tensor] = {}
    logs = [run_epoch(model, opt, data, cfg, e, teacher=t, ssl_state=state)
            for e in range(cfg.epochs)]
    return model, t, logs


# -- augmentations -------------------------------------------------------------------------


def test_weak_translates_each_row_by_its_own_shift_and_is_reproducible() -> None:
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 12:16, 12:16] = 1.0  # a centred square: a shift of <= 3 px keeps it whole
    y = augment.weak(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    torch.testing.assert_close(y.sum((1, 2, 3)), x.sum((1, 2, 3)))  # moved, not cut
    centres = {tuple(torch.nonzero(r[0]).float().mean(0).tolist()) for r in y}
    assert len(centres) > 10  # per-row shifts (a v2 transform would move all rows alike)
    assert all(abs(cy - 13.5) <= 3 and abs(cx - 13.5) <= 3 for cy, cx in centres)
    assert torch.equal(y, augment.weak(x, torch.Generator().manual_seed(0)))


def test_vector_views_perturb_rows_reproducibly() -> None:
    v = torch.randn(256, 12)
    w = augment.weak(v, torch.Generator().manual_seed(0))
    assert torch.equal(w, augment.weak(v, torch.Generator().manual_seed(0)))
    assert 0.05 < (w - v).std().item() < 0.2  # small noise, in standardized units
    s = augment.strong(v, torch.Generator().manual_seed(1))
    assert torch.equal(s, augment.strong(v, torch.Generator().manual_seed(1)))
    assert (s - v).abs().mean() > 2 * (w - v).abs().mean()  # the strong view moves further
    # VIME's corruption draws each replaced entry from the same column: without noise every
    # column keeps its multiset of values only where entries were swapped among themselves,
    # so check the marginal instead: masked entries come from that column's values
    m = augment.strong_vector(v, torch.Generator().manual_seed(2), mask_p=0.3, noise=0.0)
    changed = m != v
    assert 0.2 < changed.float().mean().item() < 0.35
    for j in range(v.shape[1]):
        assert torch.isin(m[changed[:, j], j], v[:, j]).all()


def test_translate_matches_roll_inside_the_border() -> None:
    x = torch.rand(2, 1, 8, 8)
    y = augment.translate(x, torch.tensor([2, -1]), torch.tensor([1, 0]))
    torch.testing.assert_close(y[0, :, 1:, 2:], x[0, :, :-1, :-2])
    assert torch.all(y[0, :, 0] == 0) and torch.all(y[0, :, :, :2] == 0)  # zero fill
    torch.testing.assert_close(y[1, :, :, :-1], x[1, :, :, 1:])


def test_strong_stays_in_range_differs_per_row_and_is_reproducible() -> None:
    x = torch.rand(1, 1, 28, 28).repeat(32, 1, 1, 1)  # one image, 32 times
    y = augment.strong(x, torch.Generator().manual_seed(3))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    distinct = {tuple(r.flatten()[:200].tolist()) for r in y}
    assert len(distinct) == 32  # every row got its own ops, magnitudes and cutout
    assert torch.equal(y, augment.strong(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(y, augment.strong(x, torch.Generator().manual_seed(4)))


def test_cutout_fills_one_square_per_row() -> None:
    x = torch.zeros(16, 1, 10, 10)
    y = augment.cutout(x, torch.Generator().manual_seed(0), max_frac=0.5, fill=1.0)
    area = y.sum((1, 2, 3))
    assert torch.all(area >= 1) and torch.all(area <= 25)


# -- losses and thresholds -----------------------------------------------------------------


def test_fixmatch_loss_keeps_confident_rows_and_averages_over_the_batch() -> None:
    logits_s = torch.randn(4, C, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probs_w = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8],
                            [0.34, 0.33, 0.33]])
    loss, mask, pseudo = fixmatch_loss(logits_s, probs_w, 0.8)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert pseudo.tolist() == [0, 1, 2, 0]
    ce = F.cross_entropy(logits_s, pseudo, reduction="none")
    torch.testing.assert_close(loss, (ce[0] + ce[2]) / 4)
    # per-class thresholds apply to the pseudo-label's class
    _, mask_c, _ = fixmatch_loss(logits_s, probs_w, torch.tensor([0.95, 0.5, 0.5]))
    assert mask_c.tolist() == [0.0, 1.0, 1.0, 0.0]
    loss.backward()
    assert logits_s.grad is not None and torch.all(logits_s.grad[[1, 3]] == 0)


def test_align_distribution() -> None:
    probs = torch.softmax(torch.randn(50, C, generator=torch.Generator().manual_seed(0)), 1)
    flat = torch.full((C,), 1 / C)
    torch.testing.assert_close(align_distribution(probs, flat), probs)  # nothing to correct
    skewed = torch.tensor([0.6, 0.3, 0.1])  # the model over-predicts class 0
    q = align_distribution(probs, skewed)
    torch.testing.assert_close(q.sum(1), torch.ones(50))
    assert q[:, 0].mean() < probs[:, 0].mean() and q[:, 2].mean() > probs[:, 2].mean()


def test_flexmatch_equals_the_fixed_threshold_when_all_classes_are_equally_learned() -> None:
    hist = torch.arange(30) % C  # every row confidently labeled, 10 per class
    torch.testing.assert_close(flexmatch_thresholds(hist, C, 0.95), torch.full((C,), 0.95))
    # a class learned less gets a lower threshold; nothing learned (warm-up): all 0
    hist[[1, 2, 5]] = 0  # class 0: 13 rows, class 1: 9, class 2: 8
    tau = flexmatch_thresholds(hist, C, 0.95)
    assert tau[0] == pytest.approx(0.95) and tau[2] < tau[1] < tau[0]
    none = torch.full((30,), -1)
    assert torch.all(flexmatch_thresholds(none, C, 0.95) == 0)
    # warm-up: while most rows are unused, they set the scale, so thresholds stay low
    warm = torch.cat([hist[:6], torch.full((24,), -1)])
    assert torch.all(flexmatch_thresholds(warm, C, 0.95)
                     < flexmatch_thresholds(warm, C, 0.95, warmup=False) + 1e-6)


def test_freematch_thresholds_start_at_one_over_c_and_rise_with_confidence() -> None:
    state = init_ssl_state(10, C)
    tau, p = state["tau"], state["p_local"]
    torch.testing.assert_close(freematch_thresholds(tau, p), torch.full((C,), 1 / C))
    confident = torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]])
    seen = [float(tau)]
    for _ in range(200):
        tau, p = freematch_update(tau, p, confident, momentum=0.99)
        seen.append(float(tau))
    assert all(b > a for a, b in itertools.pairwise(seen))
    thr = freematch_thresholds(tau, p)
    assert float(thr.max()) == pytest.approx(float(tau)) and float(tau) < 0.98
    # a class the model rarely predicts gets a lower threshold than the others
    skewed = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.5, 0.4, 0.1]])
    for _ in range(200):
        tau, p = freematch_update(tau, p, skewed, momentum=0.99)
    thr = freematch_thresholds(tau, p)
    assert thr[2] < thr[1] and thr[2] < thr[0]


def test_ema_update_and_decay() -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    before = copy.deepcopy(a.state_dict())
    ema_update(a, b, 1.0)
    assert _same(before, a.state_dict())
    ema_update(a, b, 0.75)
    torch.testing.assert_close(a.weight, 0.75 * before["weight"] + 0.25 * b.weight)
    ema_update(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)
    cfg = _cfg(ema=0.999)
    assert ema_decay(cfg, 0) == pytest.approx(0.1) and ema_decay(cfg, 10**6) == 0.999


# -- run_epoch with online pseudo-labels ---------------------------------------------------


def test_every_new_switch_off_trains_exactly_as_before() -> None:
    data = _data()
    plain = TrainConfig(**{**CFG.__dict__, "fixmatch": False})
    # the adaptive/offline switches only act with fixmatch on; x_u alone changes nothing
    others = dataclasses.replace(plain, threshold_mode="flexmatch", dist_align=True,
                                 offline="none")
    old, _, logs_old = _train(_data(with_u=False), plain)
    new, _, logs_new = _train(data, others)
    assert _same(_params(old), _params(new))
    assert logs_old == logs_new and "mask_rate" not in logs_new[0]


def test_fixmatch_with_lambda_zero_is_augmented_supervised_training() -> None:
    cfg0 = _cfg(lambda_u=0.0)
    with_u, _, logs = _train(_data(), cfg0)
    without_u, _, _ = _train(_data(with_u=False), cfg0)
    assert _same(_params(with_u), _params(without_u))
    assert "mask_rate" not in logs[0]  # the unlabeled pool was not even drawn
    # and the weak augmentation of labeled rows is what differs from plain supervised
    plain, _, _ = _train(_data(), TrainConfig(**{**cfg0.__dict__, "fixmatch": False}))
    assert not _same(_params(plain), _params(with_u))


@pytest.mark.parametrize("mode", ["fixed", "flexmatch", "freematch"])
def test_fixmatch_trains_on_online_labels_and_reports_them(mode: str) -> None:
    data = _data()
    cfg = _cfg(threshold_mode=mode, dist_align=mode == "freematch", offline="none")
    semi, _, logs = _train(data, cfg)
    sup, _, _ = _train(data, _cfg(lambda_u=0.0))
    assert not _same(_params(semi), _params(sup))
    for log in logs:
        assert 0.0 <= log["mask_rate"] <= 1.0
        assert 0.0 <= log["pl_accuracy"] <= 1.0
        assert log["loss"] >= log["loss_sup"] - 1e-6
    assert logs[-1]["mask_rate"] > 0  # a few rows pass 0.34 (or the adaptive thresholds)


def test_true_unlabeled_labels_only_change_the_metrics() -> None:
    data = _data()
    shuffled = dataclasses.replace(data, y_u=(data.y_u + 1) % C)  # type: ignore[operator]
    a, _, la = _train(data, _cfg())
    b, _, lb = _train(shuffled, _cfg())
    assert _same(_params(a), _params(b))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["pl_accuracy"] for r in la] != [r["pl_accuracy"] for r in lb]
    c, _, lc = _train(dataclasses.replace(data, y_u=None), _cfg())
    assert _same(_params(a), _params(c)) and np.isnan(lc[0]["pl_precision"])


def test_offline_none_ignores_the_backend_pseudo_labels() -> None:
    data = _data()
    no_p = dataclasses.replace(data, x_p=data.x_p[:0], y_p=data.y_p[:0], w_p=data.w_p[:0])
    a, _, _ = _train(data, _cfg(offline="none"))
    b, _, _ = _train(no_p, _cfg(offline="targets"))
    c, _, logs = _train(data, _cfg(offline="targets"))
    assert _same(_params(a), _params(b))
    assert not _same(_params(a), _params(c)) and logs[0]["loss_unsup"] > 0


def test_label_prior_is_a_distribution_peaked_on_the_backend_label() -> None:
    labels, conf = torch.tensor([0, 2, 1]), torch.tensor([0.9, 0.5, 1 / C])
    q = label_prior(labels, conf, C)
    torch.testing.assert_close(q.sum(1), torch.ones(3))
    assert torch.equal(q.argmax(1)[:2], labels[:2])
    torch.testing.assert_close(q[2], torch.full((C,), 1 / C))  # conf 1/C: no information


def test_apply_prior_uniform_is_identity_and_disagreement_lowers_confidence() -> None:
    p = torch.tensor([[0.96, 0.02, 0.02], [0.96, 0.02, 0.02]])
    torch.testing.assert_close(apply_prior(p, torch.full((2, C), 1 / C)), p)
    q = apply_prior(p, label_prior(torch.tensor([0, 1]), torch.tensor([0.9, 0.9]), C))
    assert q[0, 0] > p[0, 0]  # agreeing backend: more confident
    assert q[1].max() < 0.95  # disagreeing backend: below a 0.95 threshold


def test_offline_weight_schedules() -> None:
    assert offline_weight(_cfg(offline="targets", lambda_u=2.0), 90, 100) == 2.0
    assert offline_weight(_cfg(fixmatch=False, offline="none", lambda_u=2.0), 90, 100) == 2.0
    warm = [offline_weight(_cfg(offline="warm", lambda_u=2.0), s, 100) for s in (0, 25, 50, 99)]
    assert warm == [2.0, 1.0, 0.0, 0.0]
    assert offline_weight(_cfg(offline="prior"), 0, 100) == 0.0


def test_offline_prior_uniform_trains_as_none_and_an_informative_one_changes_training(
) -> None:
    data = _data(n_p=0)
    n_u = len(data.x_u)
    uniform = dataclasses.replace(data, prior_label=np.zeros(n_u, np.int64),
                                  prior_conf=np.full(n_u, 1 / C, np.float32))
    cfg = _cfg(fixmatch_threshold=0.5)
    a, _, la = _train(data, dataclasses.replace(cfg, offline="none"))
    b, _, lb = _train(uniform, dataclasses.replace(cfg, offline="prior"))
    for k in ("loss", "mask_rate"):
        assert la[-1][k] == pytest.approx(lb[-1][k], rel=1e-5)
    for k, v in _params(a).items():
        torch.testing.assert_close(v, _params(b)[k])
    # a confident prior on the true labels keeps more rows, and more of them right
    told = dataclasses.replace(data, prior_label=data.y_u, prior_conf=np.full(n_u, 0.99,
                                                                              np.float32))
    _, _, lc = _train(told, dataclasses.replace(cfg, offline="prior"))
    assert lc[0]["mask_rate"] > la[0]["mask_rate"]
    assert lc[0]["pl_precision"] == 1.0  # an untrained model can't outvote a 0.99 prior


def test_a_fixmatch_epoch_with_teacher_and_state_is_safe_to_redo() -> None:
    data = _data()
    cfg = _cfg(ema=0.9, threshold_mode="flexmatch", dist_align=True)
    model = _model()
    teacher = copy.deepcopy(model)
    opt = make_optimizer(model, cfg)
    state: dict[str, Tensor] = {}
    run_epoch(model, opt, data, cfg, 0, teacher=teacher, ssl_state=state)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), teacher.state_dict(), state))
    first = run_epoch(model, opt, data, cfg, 1, teacher=teacher, ssl_state=state)
    after = (_params(model), _params(teacher), {k: v.clone() for k, v in state.items()})

    m2, t2 = _model(seed=9), _model(seed=9)
    o2 = make_optimizer(m2, cfg)
    m2.load_state_dict(saved[0])
    o2.load_state_dict(copy.deepcopy(saved[1]))
    t2.load_state_dict(saved[2])
    s2 = copy.deepcopy(saved[3])
    second = run_epoch(m2, o2, data, cfg, 1, teacher=t2, ssl_state=s2)
    assert first == second or str(first) == str(second)  # NaN-safe comparison
    assert _same(_params(m2), after[0]) and _same(_params(t2), after[1])
    assert _same(s2, after[2])
    assert not _same(after[1], after[0])  # the teacher lags the student
    assert (s2["label_hist"] >= 0).any()  # FlexMatch recorded confident rows


def test_the_teacher_labels_the_weak_views() -> None:
    data = _data()
    cfg = _cfg(ema=0.9)
    with_teacher, _, _ = _train(data, cfg, teacher=True)
    without, _, _ = _train(data, cfg)
    assert not _same(_params(with_teacher), _params(without))


def test_ranks_draw_disjoint_unlabeled_rows() -> None:
    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(64, C)
            self.inputs: list[Tensor] = []

        def forward(self, x: Tensor) -> Tensor:
            self.inputs.append(x.detach().clone())
            return self.lin(x.flatten(1))

    rng = np.random.default_rng(0)
    x_u = rng.random((40, 64)).astype(np.float32)  # vectors: the weak view's noise is small
    x_u[:, 0] = np.arange(40)
    base = _data()
    data = TrainData(base.x_l.reshape(-1, 64), base.y_l, base.x_p[:0].reshape(0, 64),
                     base.y_p[:0], base.w_p[:0], base.x_val.reshape(-1, 64), base.y_val, 40,
                     x_u=x_u, y_u=None)
    cfg = _cfg(epochs=1, offline="none")
    seen = []
    for rank in (0, 1):
        rec = Recorder()
        run_epoch(rec, make_optimizer(rec, cfg), data, cfg, 0, rank, 2)
        nu = cfg.mu * cfg.batch_size
        assert len(rec.inputs) == steps_per_epoch(40, cfg, 2)
        weak = torch.cat([x[cfg.batch_size:cfg.batch_size + nu] for x in rec.inputs])
        seen.append(set(weak[:, 0].round().long().tolist()))  # row ids survive the noise
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(40))


@pytest.mark.parametrize("offline", ["targets", "prior"])
def test_a_rank_holding_only_its_share_of_the_pool_trains_as_with_all_rows(offline: str
                                                                          ) -> None:
    """What a Ray Train rank does with a pool left in the object store: it reads its share of
    ``x_u`` and ``x_p`` (``TrainData.for_rank``) and must train exactly as with every row,
    online labels, FlexMatch's per-row state and the backend's prior included."""
    base = _data(n_u=37, n_p=11)
    rng = np.random.default_rng(3)
    data = dataclasses.replace(base, prior_label=rng.integers(0, C, 37),
                               prior_conf=rng.uniform(0.3, 1, 37).astype(np.float32))
    cfg = _cfg(offline=offline, threshold_mode="flexmatch")

    class Held:  # the Remote protocol: rows held elsewhere
        def __init__(self, x: np.ndarray) -> None:
            self.x = x

        def __len__(self) -> int:
            return len(self.x)

        def fetch(self) -> np.ndarray:
            raise AssertionError("a rank fetched all the rows")

    held = dataclasses.replace(data, x_u=Held(data.x_u), x_p=Held(data.x_p))
    for rank in (0, 1):
        runs = []
        for d in (data, held.for_rank(rank, 2, lambda f, share: getattr(data, f)[share])):
            model, state = _model(), {}
            opt = make_optimizer(model, cfg)
            logs = [run_epoch(model, opt, d, cfg, e, rank, 2, ssl_state=state)
                    for e in range(cfg.epochs)]
            runs.append((_params(model), logs, state))
        assert _same(runs[0][0], runs[1][0])
        assert json.dumps(runs[0][1]) == json.dumps(runs[1][1])
        assert torch.equal(runs[0][2]["label_hist"], runs[1][2]["label_hist"])


# -- the Ray Train worker loop -------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_ray_train_resumes_teacher_and_thresholds_and_returns_the_teacher(tmp_path) -> None:
    """A FixMatch run (EMA teacher, FlexMatch state) that dies in epoch 2 resumes from its
    checkpoint and ends with exactly the weights of a run that never failed; the returned
    model is the EMA teacher (the same weights as the in-process loop's teacher)."""
    from faults import Fault, failing_loop

    from raysl.bench.accuracy import train_torch
    from raysl.config import DataConfig
    from raysl.data import load_dataset, make_split
    from raysl.distributed.trainer import train_classifier

    dc = DataConfig(labels_per_class=5)
    split = make_split(load_dataset(dc), dc)
    split = dataclasses.replace(split, x_u=split.x_u[:300], y_u=split.y_u[:300])
    cfg = TrainConfig(epochs=3, min_steps=0, num_workers=1, cpus_per_worker=0.5, hidden=32,
                      fixmatch=True,
                      ema=0.9, threshold_mode="flexmatch", fixmatch_threshold=0.5,
                      dist_align=True)
    data = TrainData(split.x_l, split.y_l, split.x_u[:0], split.y_u[:0],
                     np.zeros(0, np.float32), split.x_val, split.y_val, len(split.x_u),
                     x_u=split.x_u, y_u=split.y_u)
    args = (data, cfg, split.input_shape, split.n_classes, tmp_path)
    fault = Fault(str(tmp_path / "fired"), at=2, exit=False)
    with pytest.raises(Exception, match="injected fault"):
        train_classifier(*args, "crashy", max_failures=0, loop=failing_loop(fault),
                         verbose=False)
    resumed = train_classifier(*args, "crashy", verbose=False)
    fresh = train_classifier(*args, "fresh", verbose=False)
    assert resumed.resumed_from_epoch in (0, 1)
    for k in fresh.state:
        np.testing.assert_array_equal(resumed.state[k], fresh.state[k], err_msg=k)
    assert 0.0 <= fresh.history[-1]["mask_rate"] <= 1.0
    teacher, _ = train_torch(split, cfg)
    for k, v in teacher.state_dict().items():
        np.testing.assert_allclose(fresh.state[k], v.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


def test_he_init_is_opt_in_and_wakes_the_network_up() -> None:
    torch.manual_seed(0)
    default = build_model((1, 28, 28), 10)
    torch.manual_seed(0)
    explicit = build_model((1, 28, 28), 10, init="torch")
    assert _same(_params(default), _params(explicit))  # today's init stays the default
    torch.manual_seed(0)
    he = build_model((1, 28, 28), 10, init="he")
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        # default init shrinks the signal layer after layer (logits near 0: a plateau)
        assert he.eval()(x).std() > 5 * default.eval()(x).std()
    assert all(torch.all(m.bias == 0) for m in he.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="init='xavier'"):
        build_model((16,), 3, init="xavier")


# -- the accuracy benchmark ----------------------------------------------------------------


def test_bench_table_and_plot(tmp_path) -> None:
    from raysl.bench.accuracy import plot, table

    rows = [{"dataset": "digits", "labels_per_class": lpc, "method": m, "seed": s,
             "test_accuracy": acc + 0.01 * s, "seconds": 1.0}
            for lpc, acc in ((1, 0.5), (10, 0.9)) for m in ("supervised", "fixmatch")
            for s in range(3)]
    md = table(rows)
    assert "| digits | 100 (10/class) | 91.0 ± 1.0 | 91.0 ± 1.0 |" in md
    assert md.splitlines()[0] == "| dataset | labels | supervised | fixmatch |"
    plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_accuracy_runs_resumes_and_writes_its_outputs(tmp_path, capsys) -> None:
    from raysl.bench.accuracy import main

    argv = ["--out", str(tmp_path), "--datasets", "digits", "--labels", "2", "--seeds", "1",
            "--methods", "label_spreading,fixmatch", "--threads", "1",
            "--set", "train.epochs=1", "--set", "train.hidden=16"]
    assert main(argv) == 0
    runs = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 2
    assert (tmp_path / "table.md").read_text().startswith("| dataset | labels | "
                                                          "label_spreading | fixmatch |")
    assert (tmp_path / "accuracy_vs_labels.png").is_file()
    capsys.readouterr()
    assert main(argv) == 0  # finished runs are skipped
    assert "] fixmatch ..." not in capsys.readouterr().out
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2


def test_bench_oracle_runs_once_per_seed_and_is_shown_for_every_labels_count(tmp_path) -> None:
    from raysl.bench.accuracy import main, share_oracle

    argv = ["--out", str(tmp_path), "--datasets", "digits", "--labels", "1,2", "--seeds", "1",
            "--methods", "label_spreading,oracle", "--set", "train.epochs=1",
            "--set", "train.hidden=16"]
    assert main(argv) == 0
    runs = [json.loads(r) for r in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["labels_per_class"]) for r in runs) == [
        ("label_spreading", 1), ("label_spreading", 2), ("oracle", 2)]
    shared = share_oracle(runs, [1, 2])
    oracle = {r["labels_per_class"]: r["test_accuracy"] for r in shared
              if r["method"] == "oracle"}
    acc = next(r["test_accuracy"] for r in runs if r["method"] == "oracle")
    assert oracle == {1: acc, 2: acc}
    assert len((tmp_path / "table.md").read_text().split("| digits |")) == 3  # two rows
