"""Pseudo-label selection and the metrics of pseudo-labels (pure numpy, no Ray)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from raysl.metrics import expected_calibration_error, pseudo_label_metrics
from raysl.select import Selection, select

N_CLASSES = 4


@pytest.fixture(scope="module")
def proba() -> np.ndarray:
    return np.random.default_rng(0).dirichlet(np.full(N_CLASSES, 0.5), size=500)


def test_threshold_one_selects_nothing(proba: np.ndarray) -> None:
    one_hot = np.eye(N_CLASSES)[[0, 1, 2]]  # confidence exactly 1.0 is not above 1.0
    for p in (proba, one_hot):
        sel = select(p, "threshold", threshold=1.0)
        assert not sel.mask.any()
        assert sel.coverage == 0.0


def test_threshold_zero_selects_everything(proba: np.ndarray) -> None:
    sel = select(proba, "threshold", threshold=0.0)
    assert sel.mask.all()
    assert sel.coverage == 1.0


def test_threshold_is_strict() -> None:
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.95, 0.05]])
    np.testing.assert_array_equal(select(p, threshold=0.9).mask, [False, False, True])


def test_selection_labels_and_confidences_are_argmax_and_max(proba: np.ndarray) -> None:
    sel = select(proba, threshold=0.7)
    np.testing.assert_array_equal(sel.labels, proba.argmax(1))
    np.testing.assert_array_equal(sel.conf, proba.max(1))
    np.testing.assert_array_equal(sel.mask, proba.max(1) > 0.7)
    assert sel.labels.dtype == np.int64
    assert 0.0 < sel.coverage < 1.0


def test_coverage_is_non_increasing_in_the_threshold(proba: np.ndarray) -> None:
    thresholds = np.linspace(0.0, 1.0, 41)
    cov = np.array([select(proba, "threshold", threshold=t).coverage for t in thresholds])
    assert np.all(np.diff(cov) <= 0.0)
    assert cov[0] == 1.0 and cov[-1] == 0.0
    assert len(np.unique(cov)) > 10  # the curve actually moves through the range
    # nested: every row kept at a high threshold is kept at a lower one
    masks = [select(proba, threshold=t).mask for t in thresholds]
    for lo, hi in itertools.pairwise(masks):
        assert np.all(lo | ~hi)


@pytest.mark.parametrize("k", [1, 37, 499, 500])
def test_k_best_keeps_exactly_k_most_confident(proba: np.ndarray, k: int) -> None:
    sel = select(proba, "k_best", k_best=k)
    assert sel.mask.sum() == k
    conf = proba.max(1)
    if k < len(conf):
        assert conf[sel.mask].min() >= conf[~sel.mask].max()


def test_k_best_keeps_all_rows_when_there_are_fewer(proba: np.ndarray) -> None:
    sel = select(proba[:20], "k_best", k_best=100)
    assert sel.mask.all()
    assert sel.coverage == 1.0


def test_k_best_ties_go_to_the_lower_row_index() -> None:
    p = np.array([[0.6, 0.4], [0.7, 0.3], [0.6, 0.4], [0.6, 0.4], [0.2, 0.8]])
    np.testing.assert_array_equal(select(p, "k_best", k_best=3).mask,
                                  [True, True, False, False, True])


def test_unknown_criterion_is_rejected(proba: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"select\.criterion='best'"):
        select(proba, "best")


@pytest.mark.parametrize(("criterion", "kw"), [("threshold", {"threshold": 0.6}),
                                               ("k_best", {"k_best": 123})])
def test_per_class_counts_sum_to_the_number_kept(proba: np.ndarray, criterion: str,
                                                 kw: dict[str, float]) -> None:
    sel = select(proba, criterion, **kw)  # type: ignore[arg-type]
    counts = sel.per_class(N_CLASSES)
    assert len(counts) == N_CLASSES
    assert sum(counts) == int(sel.mask.sum()) > 0
    for c in range(N_CLASSES):
        assert counts[c] == int(np.sum(sel.mask & (proba.argmax(1) == c)))


def test_per_class_pads_classes_that_are_never_kept() -> None:
    sel = Selection(np.array([True, True, False]), np.array([1, 1, 0]), np.ones(3))
    assert sel.per_class(4) == [0, 2, 0, 0]


def test_empty_pool() -> None:
    sel = select(np.zeros((0, 3)), threshold=0.5)
    assert sel.coverage == 0.0
    assert sel.per_class(3) == [0, 0, 0]


# -- metrics -------------------------------------------------------------------------------


def test_pseudo_label_metrics_on_a_hand_made_example() -> None:
    proba = np.array([
        [0.90, 0.05, 0.05],  # label 0, kept, true 0 -> correct
        [0.10, 0.85, 0.05],  # label 1, kept, true 2 -> wrong
        [0.05, 0.05, 0.90],  # label 2, kept, true -1 (unknown) -> not in precision
        [0.40, 0.35, 0.25],  # label 0, not kept, true 0 -> counts for argmax accuracy
        [0.30, 0.45, 0.25],  # label 1, not kept, true 2 -> wrong
        [0.02, 0.97, 0.01],  # label 1, kept, true 1 -> correct
    ])
    y_true = np.array([0, 2, -1, 0, 2, 1])
    sel = select(proba, threshold=0.8)
    np.testing.assert_array_equal(sel.mask, [True, True, True, False, False, True])
    m = pseudo_label_metrics(sel, y_true)
    assert m["n_selected"] == 4
    assert m["coverage"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)  # kept and known: rows 0, 1, 5
    assert m["argmax_accuracy"] == pytest.approx(3 / 5)  # known: rows 0, 1, 3, 4, 5


def test_pseudo_label_metrics_nan_when_nothing_qualifies() -> None:
    proba = np.array([[0.6, 0.4], [0.3, 0.7]])
    m = pseudo_label_metrics(select(proba, threshold=1.0), np.array([0, 1]))
    assert m["n_selected"] == 0 and m["coverage"] == 0.0
    assert np.isnan(m["precision"])
    assert m["argmax_accuracy"] == 1.0
    m = pseudo_label_metrics(select(proba, threshold=0.0), np.array([-1, -1]))
    assert np.isnan(m["precision"]) and np.isnan(m["argmax_accuracy"])
    assert m["coverage"] == 1.0


def test_ece_is_zero_for_confident_correct_predictions() -> None:
    y = np.array([0, 2, 1, 1, 0])
    assert expected_calibration_error(np.eye(3)[y], y) == 0.0


def test_ece_is_positive_for_overconfident_wrong_predictions() -> None:
    y = np.array([0, 2, 1, 1, 0])
    wrong = np.full((5, 3), 0.05)
    wrong[np.arange(5), (y + 1) % 3] = 0.9
    assert expected_calibration_error(wrong, y) == pytest.approx(0.9)
    # all-correct but under-confident is miscalibrated too, by 1 - confidence
    right = np.full((5, 3), 0.2)
    right[np.arange(5), y] = 0.6
    assert expected_calibration_error(right, y) == pytest.approx(0.4)


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # 10 rows at confidence 0.7 of which exactly 7 are right: one bin, |0.7 - 0.7| = 0
    proba = np.tile([0.7, 0.3], (10, 1))
    y = np.array([0] * 7 + [1] * 3)
    assert expected_calibration_error(proba, y) == pytest.approx(0.0, abs=1e-12)


def test_ece_ignores_unknown_labels() -> None:
    y = np.array([0, 1, -1])
    proba = np.eye(2)[[0, 1, 0]]
    assert expected_calibration_error(proba, y) == 0.0
    assert np.isnan(expected_calibration_error(proba, np.full(3, -1)))


def test_ece_bins_of_parts_add_up_to_the_ece_of_the_whole(proba: np.ndarray) -> None:
    from raysl.metrics import ece_bins, ece_from_bins

    y = np.random.default_rng(1).integers(-1, N_CLASSES, len(proba))  # some unknown (-1)
    conf, pred = proba.max(1), proba.argmax(1)
    whole = expected_calibration_error(proba, y)
    parts = sum(ece_bins(conf[a:b], pred[a:b], y[a:b]) for a, b in ((0, 7), (7, 300), (300, 500)))
    assert ece_from_bins(parts) == pytest.approx(whole, abs=1e-12)
    # the formula itself: sum over bins of |accuracy - confidence| weighted by the bin's rows
    known = y >= 0
    edges = np.linspace(0, 1, 16)
    which = np.clip(np.digitize(conf[known], edges[1:-1], right=True), 0, 14)
    direct = sum((which == b).mean() * abs((pred[known] == y[known])[which == b].mean()
                                            - conf[known][which == b].mean())
                 for b in range(15) if (which == b).any())
    assert whole == pytest.approx(direct, abs=1e-12)
    assert np.isnan(ece_from_bins(ece_bins(conf, pred, np.full(len(y), -1))))


@pytest.mark.parametrize("n_shards", [1, 3])
def test_shard_workers_label_the_pool_as_its_gathered_probabilities_would(n_shards: int) -> None:
    """What the pipeline keeps of a backend's probabilities, computed by each shard's worker
    (the probabilities are not gathered), equals what the gathered probabilities give:
    calibrated labels and confidences, the same aligned to the labeled prior (from the whole
    pool's mean), and the uncalibrated ECE; on one shard and on three."""
    from raysl import pipeline
    from raysl.backends import BACKENDS, FitContext
    from raysl.backends.base import LabelCall, fit
    from raysl.calibration import apply_temperature
    from raysl.columns import split_columns
    from raysl.config import Config, apply_overrides
    from raysl.data import shard_bounds
    from raysl.select import align_to_prior, class_prior

    cfg = apply_overrides(Config(), {"ray.enabled": False, "backend.name": "gmm",
                                     "backend.gmm.max_iter": 4, "data.n_shards": n_shards})
    split = pipeline.check(cfg)
    ctx = FitContext(split.n_classes, split.input_shape, 0)
    factory = BACKENDS["gmm"]
    with pipeline.shard_workers(split, cfg, ctx, use_ray=False) as (ex, _):
        res = fit(factory(cfg.backend, ctx), ex, split.x_l, split.y_l)
        call = LabelCall(res.state, 3.0, 1e-12, "t")
        base = split_columns(split.idx_u, split.y_u, shard_bounds(len(split.y_u), n_shards))
        pool, ece_raw = pipeline.pool_labels(ex, call, split, base)
    assert res.proba is not None
    assert pool.sizes == tuple(b - a for a, b in shard_bounds(len(split.y_u), n_shards))
    labels, conf, labels_al, conf_al, row = pool.gather(
        "label", "conf", "label_aligned", "conf_aligned", "row")
    scaled = apply_temperature(res.proba.copy(), 3.0)
    np.testing.assert_array_equal(labels, scaled.argmax(1))
    np.testing.assert_array_equal(conf, scaled.max(1))
    aligned = align_to_prior(scaled, class_prior(split.y_l, split.n_classes))
    np.testing.assert_array_equal(labels_al, aligned.argmax(1))
    np.testing.assert_allclose(conf_al, aligned.max(1), rtol=1e-6)
    np.testing.assert_array_equal(row, split.idx_u)
    assert ece_raw == pytest.approx(expected_calibration_error(res.proba, split.y_u), abs=1e-9)


def test_alignment_takes_read_only_vectors_from_the_object_store_without_a_warning() -> None:
    """A shard actor gets the pool's mean prediction and the prior read-only (Ray's object
    store): the alignment is the same as with writable copies, and torch does not warn."""
    import warnings

    from raysl.select import align_to_prior

    p = np.random.default_rng(0).dirichlet(np.ones(3), 6)
    mean, prior = p.mean(0), np.array([0.2, 0.3, 0.5])
    want = align_to_prior(p, prior.copy(), mean.copy())
    mean.setflags(write=False)
    prior.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = align_to_prior(p, prior, mean)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, p)  # the alignment moved the probabilities


def _reference(labels: np.ndarray, conf: np.ndarray, n_classes: int, criterion: str,
               k_best: int, share: float) -> np.ndarray:
    """The selection by sorting every row at once (what the sharded plan must reproduce)."""
    from raysl.select import per_class_k

    mask = np.zeros(len(conf), bool)
    order = lambda rows: rows[np.argsort(-conf[rows], kind="stable")]  # noqa: E731
    if criterion == "k_best":
        mask[order(np.arange(len(conf)))[:k_best]] = True
        return mask
    k = per_class_k(np.full(n_classes, 1.0 / n_classes), len(conf), share)
    have = np.bincount(labels, minlength=n_classes)
    fill = min(1.0, *(have[k > 0] / k[k > 0]))
    k = np.floor(k * fill + 1e-9).astype(np.int64)
    for c in range(n_classes):
        mask[order(np.flatnonzero(labels == c))[: k[c]]] = True
    return mask


@pytest.mark.parametrize("n_shards", [1, 3, 7])
@pytest.mark.parametrize(("criterion", "k_best", "share"),
                         [("k_best", 1, 0.5), ("k_best", 37, 0.5), ("k_best", 10_000, 0.5),
                          ("per_class", 100, 0.5), ("per_class", 100, 0.9),
                          ("per_class", 100, 0.01)])
def test_a_plan_over_shards_keeps_the_rows_sorting_them_all_would(
        n_shards: int, criterion: str, k_best: int, share: float) -> None:
    """The radix select over shards' histograms keeps exactly the rows a global sort keeps,
    ties (many: confidences on a grid of 50 values) to the lower pool position, a class the
    backend rarely predicts scaling every class's quota."""
    from raysl.data import shard_bounds
    from raysl.select import plan_selection

    rng = np.random.default_rng(n_shards)
    n = 2_000
    labels = rng.choice(N_CLASSES, n, p=[0.6, 0.3, 0.08, 0.02])
    conf = (rng.integers(0, 50, n) / 49).astype(np.float32)
    bounds = shard_bounds(n, n_shards)

    def run(fn, **kw):  # type: ignore[no-untyped-def]
        return [fn(labels[a:b], conf[a:b], a, **kw) for a, b in bounds]

    rule = plan_selection(run, n, N_CLASSES, criterion, k_best=k_best, share=share)
    mask = np.concatenate([rule.mask(labels[a:b], conf[a:b], a) for a, b in bounds])
    want = _reference(labels, conf, N_CLASSES, criterion, k_best, share)
    np.testing.assert_array_equal(mask, want)
    assert 0 < mask.sum() < n or (criterion == "k_best" and k_best >= n)


def test_rank_keys_order_rows_by_confidence_then_position() -> None:
    from raysl.select import rank_keys

    conf = np.array([0.5, 1.0, 0.0, 0.5, -0.0, 0.25], np.float32)
    keys = np.concatenate([rank_keys(conf[:3], 0), rank_keys(conf[3:], 3)])
    np.testing.assert_array_equal(np.argsort(keys), [1, 0, 3, 5, 2, 4])
    with pytest.raises(ValueError, match="at most"):
        rank_keys(conf, (1 << 31) - 2)


@pytest.mark.parametrize("world", [1, 2, 3, 500])
def test_share_of_places_a_shards_rows_in_a_ranks_share_of_the_kept_rows(world: int) -> None:
    """A shard's rows' places in a rank's share of the kept rows, worked out from the shard's
    mask and the kept count before it alone, are those of raysl.data.rank_share over the
    kept rows' positions (and of every row without a mask)."""
    from raysl.columns import share_of
    from raysl.data import find_sorted, rank_share, shard_bounds

    rng = np.random.default_rng(world)
    n = 200
    keep = rng.random(n) < 0.4
    kept = np.flatnonzero(keep)
    for mask_all in (keep, None):
        rows = kept if mask_all is not None else np.arange(n)
        for rank in range(min(world, 4)):
            want = rows[rank_share(len(rows), rank, world)]
            before = 0
            for a, b in shard_bounds(n, 3):
                keys = rng.permutation(np.arange(a, b))  # in any order
                m = None if mask_all is None else keep[a:b]
                hit, at = share_of(keys, a, m, before if m is not None else a, len(rows),
                                   rank, world)
                before += int(keep[a:b].sum())
                pos, in_want = find_sorted(want, keys)
                np.testing.assert_array_equal(hit, in_want)
                np.testing.assert_array_equal(at[hit], pos[in_want])
