"""The joint loss and the training epoch in plain PyTorch (no Ray, no DDP process group)."""

from __future__ import annotations

import copy
import itertools
import math
import mmap
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysl.config import TrainConfig
from raysl.data import rank_share
from raysl.losses import joint_loss
from raysl.models import MLP, SmallCNN, build_model
from raysl.objectives import rank_rows
from raysl.train import (
    RankRows,
    TrainData,
    accuracy,
    learning_rate,
    make_optimizer,
    predict_proba,
    run_epoch,
    state_from_numpy,
    state_to_numpy,
    steps_per_epoch,
)

N_CLASSES = 3
ID_SCALE = 1e-4
# The offline loop as it was before FixMatch became the default: no online labels, no EMA,
# PyTorch's initial weights, no step floor.
CFG = TrainConfig(epochs=2, batch_size=8, mu=2, lr=0.05, hidden=32, num_workers=0, seed=0,
                  fixmatch=False, ema=0.0, init="torch", min_steps=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(input_shape: tuple[int, ...], n_p: int = 60, n_l: int = 30, n_u: int = 200,
          seed: int = 0) -> TrainData:
    """Random rows in [0, 1) whose feature 0 encodes a row id as ``id * ID_SCALE`` (labeled
    0.., pseudo-labeled 1000..); see :func:`_ids`."""
    rng = np.random.default_rng(seed)

    def rows(n: int, first_id: int) -> np.ndarray:
        x = rng.random((n, *input_shape)).astype(np.float32)
        x.reshape(n, -1)[:, 0] = np.arange(first_id, first_id + n) * ID_SCALE
        return x

    return TrainData(
        x_l=rows(n_l, 0), y_l=rng.integers(0, N_CLASSES, n_l).astype(np.int64),
        x_p=rows(n_p, 1000), y_p=rng.integers(0, N_CLASSES, n_p).astype(np.int64),
        w_p=rng.uniform(0.5, 1.0, n_p).astype(np.float32),
        x_val=rows(10, 5000), y_val=rng.integers(0, N_CLASSES, 10).astype(np.int64),
        n_u=n_u,
    )


def _ids(x: Tensor) -> Tensor:
    """Row ids of a recorded batch (n, ...)."""
    return torch.round(x.flatten(1)[:, 0].double() / ID_SCALE).long()


def _without_pseudo(data: TrainData) -> TrainData:
    return TrainData(data.x_l, data.y_l, data.x_p[:0], data.y_p[:0], data.w_p[:0], data.x_val,
                     data.y_val, data.n_u)


def _model(input_shape: tuple[int, ...], init_seed: int = 123) -> nn.Module:
    torch.manual_seed(init_seed)
    return build_model(input_shape, N_CLASSES, CFG.hidden)


def _train(model: nn.Module, data: TrainData, cfg: TrainConfig, rank: int = 0,
           world_size: int = 1) -> list[dict[str, float]]:
    opt = make_optimizer(model, cfg)
    return [run_epoch(model, opt, data, cfg, e, rank, world_size) for e in range(cfg.epochs)]


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


class Recorder(nn.Module):
    """A linear model without dropout that records every input batch."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, N_CLASSES)
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.lin(x.flatten(1))


# -- the loss ------------------------------------------------------------------------------


def _logits(n: int, seed: int) -> Tensor:
    return torch.randn(n, N_CLASSES, generator=torch.Generator().manual_seed(seed))


def test_joint_loss_without_pseudo_rows_is_cross_entropy() -> None:
    logits, y = _logits(6, 0), torch.tensor([0, 1, 2, 0, 1, 2])
    total, sup, unsup = joint_loss(logits, y)
    assert torch.equal(total, F.cross_entropy(logits, y))
    assert torch.equal(sup, total)
    assert unsup.item() == 0.0


def test_joint_loss_with_lambda_zero_equals_cross_entropy() -> None:
    logits, y = _logits(6, 0), torch.tensor([0, 1, 2, 0, 1, 2])
    lu, yu = _logits(5, 1), torch.tensor([2, 2, 1, 0, 0])
    total, _, unsup = joint_loss(logits, y, lu, yu, torch.ones(5), lambda_u=0.0)
    assert torch.equal(total, F.cross_entropy(logits, y))
    assert unsup.item() > 0.0  # the unsupervised term exists, it is just not counted


def test_joint_loss_with_zero_weights_has_no_unsup_term() -> None:
    logits, y = _logits(6, 0), torch.tensor([0, 1, 2, 0, 1, 2])
    lu, yu = _logits(5, 1), torch.tensor([2, 2, 1, 0, 0])
    total, _, unsup = joint_loss(logits, y, lu, yu, torch.zeros(5), lambda_u=3.0)
    assert unsup.item() == 0.0
    assert torch.equal(total, F.cross_entropy(logits, y))


def test_joint_loss_weights_and_averages_over_the_whole_pseudo_batch() -> None:
    logits, y = _logits(6, 0), torch.tensor([0, 1, 2, 0, 1, 2])
    lu, yu = _logits(4, 1), torch.tensor([2, 2, 1, 0])
    w = torch.tensor([1.0, 0.5, 0.0, 0.0])
    total, _, unsup = joint_loss(logits, y, lu, yu, w, lambda_u=2.0)
    ce = F.cross_entropy(lu, yu, reduction="none")
    expected_unsup = (ce[0] + 0.5 * ce[1]) / 4  # divided by the batch, not by the kept rows
    torch.testing.assert_close(unsup, expected_unsup)
    torch.testing.assert_close(total, F.cross_entropy(logits, y) + 2.0 * expected_unsup)


def test_joint_loss_gradient_reaches_pseudo_logits_only_when_counted() -> None:
    lu = _logits(4, 1).requires_grad_()
    logits = _logits(6, 0).requires_grad_()
    y, yu = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 0])
    joint_loss(logits, y, lu, yu, torch.ones(4), lambda_u=0.0)[0].backward()
    assert lu.grad is not None and torch.all(lu.grad == 0)
    lu.grad = None
    joint_loss(logits, y, lu, yu, torch.ones(4), lambda_u=1.0)[0].backward()
    assert lu.grad is not None and torch.any(lu.grad != 0)


# -- schedule ------------------------------------------------------------------------------


def test_steps_per_epoch_and_learning_rate() -> None:
    assert steps_per_epoch(200, CFG, 1) == math.ceil(200 / 16)
    assert steps_per_epoch(200, CFG, 2) == math.ceil(200 / 32)
    assert steps_per_epoch(0, CFG, 1) == 1
    # a small pool: the step floor spreads min_steps over the epochs
    floor = TrainConfig(**{**CFG.__dict__, "min_steps": 101, "epochs": 10})
    assert steps_per_epoch(20, floor, 1) == 11
    assert steps_per_epoch(2000, floor, 1) == math.ceil(2000 / 16)  # a long pass wins
    total = 100
    lrs = [learning_rate(CFG, s, total) for s in range(total)]
    assert lrs[0] == CFG.lr
    assert all(b < a for a, b in itertools.pairwise(lrs))  # strictly decaying
    assert lrs[-1] > 0.0


def test_run_epoch_sets_the_learning_rate_from_the_step() -> None:
    data = _data((16,))
    model = _model((16,))
    opt = make_optimizer(model, CFG)
    steps = steps_per_epoch(data.n_u, CFG, 1)
    for epoch in range(CFG.epochs):
        run_epoch(model, opt, data, CFG, epoch)
        last = learning_rate(CFG, (epoch + 1) * steps - 1, steps * CFG.epochs)
        assert opt.param_groups[0]["lr"] == last


# -- run_epoch invariants ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16,), (1, 8, 8)])
def test_lambda_zero_equals_supervised_training(shape: tuple[int, ...]) -> None:
    data = _data(shape)
    cfg0 = TrainConfig(**{**CFG.__dict__, "lambda_u": 0.0})

    with_pseudo = _model(shape)
    logs = _train(with_pseudo, data, cfg0)
    supervised = _model(shape)
    _train(supervised, _without_pseudo(data), cfg0)
    # no pseudo rows at all, and lambda_u > 0: nothing to weight, also supervised
    nothing_kept = _model(shape)
    _train(nothing_kept, _without_pseudo(data), CFG)

    assert _identical(_params(with_pseudo), _params(supervised))
    assert _identical(_params(nothing_kept), _params(supervised))
    assert not _identical(_params(supervised), _params(_model(shape)))  # it did train
    assert all(log["loss_unsup"] == 0.0 for log in logs)
    assert all(log["steps"] == steps_per_epoch(data.n_u, cfg0, 1) for log in logs)


@pytest.mark.parametrize("shape", [(16,), (1, 8, 8)])
def test_positive_lambda_uses_the_pseudo_labels(shape: tuple[int, ...]) -> None:
    data = _data(shape)
    semi = _model(shape)
    logs = _train(semi, data, CFG)
    supervised = _model(shape)
    _train(supervised, _without_pseudo(data), CFG)
    assert not _identical(_params(semi), _params(supervised))
    assert all(log["loss_unsup"] > 0.0 for log in logs)
    for log in logs:
        assert log["loss"] == pytest.approx(log["loss_sup"] + CFG.lambda_u * log["loss_unsup"])


def test_labeled_stream_does_not_depend_on_the_pseudo_rows() -> None:
    data = _data((16,))
    seen = []
    for lam, d in ((0.0, data), (1.0, data), (1.0, _without_pseudo(data))):
        rec = Recorder(16)
        _train(rec, d, TrainConfig(**{**CFG.__dict__, "lambda_u": lam}))
        seen.append([_ids(x[:CFG.batch_size]) for x in rec.inputs])
    for other in seen[1:]:
        assert len(other) == len(seen[0])
        assert all(torch.equal(a, b) for a, b in zip(seen[0], other, strict=True))


def test_an_epoch_is_safe_to_redo() -> None:
    shape = (16,)
    data = _data(shape)
    model = _model(shape)
    opt = make_optimizer(model, CFG)
    run_epoch(model, opt, data, CFG, 0)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert saved_opt["state"], "momentum buffers exist, so restoring them matters"

    first = run_epoch(model, opt, data, CFG, 1)
    after_first = _params(model)

    # a "crash": a fresh model and optimizer restored from the checkpoint redo epoch 1
    model2 = _model(shape, init_seed=999)
    opt2 = make_optimizer(model2, CFG)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(copy.deepcopy(saved_opt))  # load_state_dict may alias its input
    second = run_epoch(model2, opt2, data, CFG, 1)

    assert _identical(_params(model2), after_first)
    assert first == second
    # and restoring in place works too
    model.load_state_dict(saved_model)
    opt.load_state_dict(copy.deepcopy(saved_opt))
    run_epoch(model, opt, data, CFG, 1)
    assert _identical(_params(model), after_first)


def test_redoing_an_epoch_without_the_optimizer_state_differs() -> None:
    # the control for the test above: the comparison notices a missing momentum buffer
    shape = (16,)
    data = _data(shape)
    model = _model(shape)
    opt = make_optimizer(model, CFG)
    run_epoch(model, opt, data, CFG, 0)
    saved_model = copy.deepcopy(model.state_dict())
    run_epoch(model, opt, data, CFG, 1)
    after_first = _params(model)
    model.load_state_dict(saved_model)
    run_epoch(model, make_optimizer(model, CFG), data, CFG, 1)
    assert not _identical(_params(model), after_first)


def test_two_ranks_draw_different_labeled_batches() -> None:
    data = _data((16,))
    cfg = TrainConfig(**{**CFG.__dict__, "lambda_u": 0.0, "epochs": 1})
    weights = {}
    for rank in (0, 1, 0):
        torch.manual_seed(7)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, N_CLASSES))  # no dropout: only the
        _train(model, data, cfg, rank=rank, world_size=2)  # batches depend on the rank
        weights.setdefault(rank, []).append(_params(model))
    assert _identical(weights[0][0], weights[0][1])  # deterministic per rank
    assert not _identical(weights[0][0], weights[1][0])


def test_ranks_get_different_labeled_rows_and_disjoint_pseudo_rows() -> None:
    data = _data((16,), n_p=41)
    ids: dict[int, tuple[Tensor, Tensor]] = {}
    for rank in (0, 1):
        rec = Recorder(16)
        _train(rec, data, TrainConfig(**{**CFG.__dict__, "epochs": 1}), rank=rank,
               world_size=2)
        assert len(rec.inputs) == steps_per_epoch(data.n_u, CFG, 2)
        batches = torch.stack([_ids(x[:CFG.batch_size]) for x in rec.inputs])
        pseudo = torch.cat([_ids(x[CFG.batch_size:]) for x in rec.inputs])
        assert all(len(x) == CFG.batch_size * (1 + CFG.mu) for x in rec.inputs)
        ids[rank] = (batches, pseudo)
    assert not torch.equal(ids[0][0], ids[1][0])
    p0, p1 = (set(ids[r][1].tolist()) for r in (0, 1))
    assert p0.isdisjoint(p1)  # each rank its own share of the pseudo-labeled rows
    assert p0 | p1 == set(range(1000, 1041))
    assert abs(len(p0) - len(p1)) <= 1


def _mapped(a: np.ndarray) -> bool:
    """Whether ``a`` is a view of a memory map (a :func:`raysl.memory.disk_array`)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a.obj if isinstance(a, memoryview) else a, mmap.mmap)


class _Held:
    """Rows held elsewhere (the :class:`raysl.data.Remote` protocol), as a split read with Ray
    leaves the pool: ``TrainData.for_rank`` must read only the rank's share of them."""

    def __init__(self, x: np.ndarray, on_disk: bool = False) -> None:
        self.x, self.on_disk = x, on_disk
        self.reads: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.x)

    def fetch(self) -> np.ndarray:
        raise AssertionError("a rank fetched all the rows")

    def read(self, field: str, share: np.ndarray) -> np.ndarray:
        from raysl.distributed.pool import share_from_batches

        self.reads.append(share)
        # as a Ray Train rank assembles its share: batches of (index in the share, rows)
        half = len(share) // 2
        batches = [{"i": np.arange(a, b), "x": self.x[share[a:b]]}
                   for a, b in ((half, len(share)), (0, half))]
        return share_from_batches(batches, len(share), self.x.shape[1:],
                                  on_disk=self.on_disk)["x"]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 41])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_split_the_rows(n: int, world: int) -> None:
    shares = [rank_share(n, r, world) for r in range(world)]
    if n < world:  # too few to split: every rank trains on all of them
        assert all(np.array_equal(s, np.arange(n)) for s in shares)
        return
    both = np.concatenate(shares)
    assert np.array_equal(np.sort(both), np.arange(n))  # disjoint and complete
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for r, s in enumerate(shares):  # and every epoch's draws stay in the share
        drawn = rank_rows(n, 7, CFG, epoch=3, rank=r, world_size=world, keys=(1, 2))
        assert set(drawn.ravel().tolist()) <= set(s.tolist())
        if 0 < len(s) <= drawn.size:
            assert set(drawn.ravel().tolist()) == set(s.tolist())


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("on_disk", [False, True])
def test_a_rank_holding_only_its_share_trains_as_with_all_rows(world: int, on_disk: bool
                                                               ) -> None:
    """... on the heap or in a file-backed array (``train.share_storage=disk``)."""
    data = _data((16,), n_p=41)
    held = _Held(data.x_p, on_disk)
    for rank in range(world):
        full, local = _model((16,)), _model((16,))
        _train(full, data, CFG, rank=rank, world_size=world)
        mine = replace(data, x_p=held).for_rank(rank, world, held.read)
        assert isinstance(mine.x_p, RankRows) and len(mine.x_p) == 41
        assert _mapped(mine.x_p.rows) == on_disk
        _train(local, mine, CFG, rank=rank, world_size=world)
        assert _identical(_params(full), _params(local))
        assert np.array_equal(held.reads[-1], rank_share(41, rank, world))
        if world > 1:
            with pytest.raises(IndexError, match="share"):  # another rank's row is not here
                mine.x_p[np.array([1 - rank])]


# -- models and prediction -----------------------------------------------------------------


@pytest.mark.parametrize(("shape", "cls"), [((1, 8, 8), SmallCNN), ((64,), MLP),
                                            ((3, 32, 32), SmallCNN)])
def test_build_model_picks_the_architecture_from_the_shape(shape: tuple[int, ...],
                                                           cls: type) -> None:
    model = build_model(shape, 7, hidden=16)
    assert isinstance(model, cls)
    out = model(torch.zeros(5, *shape))
    assert out.shape == (5, 7)


def test_build_model_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"input_shape=\(8, 8\)"):
        build_model((8, 8), 10)


def test_predict_proba_and_accuracy() -> None:
    data = _data((1, 8, 8))
    model = _model((1, 8, 8))
    p = predict_proba(model, data.x_l, batch_size=7)  # several batches
    assert p.shape == (len(data.x_l), N_CLASSES)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(p, predict_proba(model, data.x_l), rtol=1e-5, atol=1e-7)
    assert not model.training  # eval mode: dropout off, so predictions are deterministic
    acc = accuracy(model, data.x_l, data.y_l)
    assert acc == float((p.argmax(1) == data.y_l).mean())
    assert math.isnan(accuracy(model, data.x_l[:0], data.y_l[:0]))


def test_state_numpy_round_trip() -> None:
    model = _model((16,))
    state = state_to_numpy(model.state_dict())
    assert all(isinstance(v, np.ndarray) for v in state.values())
    other = _model((16,), init_seed=5)
    other.load_state_dict(state_from_numpy(state))
    assert _identical(_params(other), _params(model))
