"""Data: the deterministic split, user .npz files, input errors and sharding (no Ray)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from raysl.config import DataConfig
from raysl.data import (
    LABELED,
    POOL,
    TEST,
    VAL,
    Dataset,
    Split,
    load_dataset,
    make_split,
    plan_split,
    shard,
    shard_bounds,
    split_keys,
)
from raysl.errors import DataError


def _synthetic(counts: list[int], n_unlabeled: int = 0, d: int = 3, seed: int = 0) -> Dataset:
    """Classes of the given sizes plus ``n_unlabeled`` rows with y = -1, in shuffled order.
    Feature 0 is the row index, so every split part can be mapped back to its rows."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)] + [np.full(n_unlabeled, -1)])
    y = rng.permutation(y).astype(np.int64)
    x = rng.standard_normal((len(y), d)).astype(np.float32)
    x[:, 0] = np.arange(len(y))
    return Dataset("synthetic", x, y, len(counts))


def _rows(x: np.ndarray) -> np.ndarray:
    return x[:, 0].astype(np.int64)


def _parts(sp: Split) -> dict[str, np.ndarray]:
    return {"l": _rows(sp.x_l), "u": _rows(sp.x_u), "val": _rows(sp.x_val),
            "test": _rows(sp.x_test)}


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig())


# -- the split -----------------------------------------------------------------------------


def test_make_split_is_deterministic(digits: Dataset) -> None:
    cfg = DataConfig()
    a, b = make_split(digits, cfg), make_split(digits, cfg)
    np.testing.assert_array_equal(a.idx_l, b.idx_l)
    np.testing.assert_array_equal(a.idx_u, b.idx_u)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.key == b.key


def test_a_different_seed_gives_a_different_split(digits: Dataset) -> None:
    a = make_split(digits, DataConfig(seed=0))
    b = make_split(digits, DataConfig(seed=1))
    assert not np.array_equal(a.idx_l, b.idx_l)
    assert not np.array_equal(a.idx_u, b.idx_u)
    assert a.key != b.key


def test_split_key_ignores_n_shards_but_tracks_split_parameters(digits: Dataset) -> None:
    base = make_split(digits, DataConfig())
    assert make_split(digits, DataConfig(n_shards=5)).key == base.key
    assert make_split(digits, DataConfig(labels_per_class=6)).key != base.key


def test_split_keys_are_distinct_per_id_and_depend_on_the_seed_alone() -> None:
    ids = np.concatenate([np.arange(100_000), (np.arange(1, 1001) << 32) + 7])
    k = split_keys(ids, 3)
    assert k.dtype == np.uint64 and len(np.unique(k)) == len(ids)  # no two rows tie
    np.testing.assert_array_equal(split_keys(ids[::-1], 3), k[::-1])  # row by row
    np.testing.assert_array_equal(split_keys(ids[5:9], 3), k[5:9])
    assert (split_keys(ids, 4) != k).mean() > 0.999
    # a shuffle: consecutive ids land anywhere (the top bit is a fair coin, in every run)
    assert 0.45 < (k[:100_000] >> np.uint64(63)).mean() < 0.55


def test_the_split_is_a_function_of_the_row_ids_not_of_their_order() -> None:
    """The same rows (with their ids) in another order, and with other classes' rows gone,
    give the same split: a row's part depends on its id, the seed and its class's size."""
    ds = _synthetic([60, 45, 50], n_unlabeled=40)
    ids = np.arange(len(ds.y)) * 1_000_003 + 11
    cfg = DataConfig(labels_per_class=4, val_per_class=3, test_fraction=0.2, seed=5)
    base = _parts(make_split(replace(ds, ids=ids), cfg))
    perm = np.random.default_rng(0).permutation(len(ds.y))
    moved = replace(ds, x=ds.x[perm], y=ds.y[perm], ids=ids[perm])
    other = _parts(make_split(moved, cfg))
    for name in ("l", "val", "test"):
        np.testing.assert_array_equal(np.sort(other[name]), np.sort(base[name]), err_msg=name)
    np.testing.assert_array_equal(other["u"], base["u"])  # the pool in the same order
    # class 2 alone (its rows, its ids): the same rows of class 2 in each part
    keep = ds.y == 2
    alone = _parts(make_split(replace(ds, x=ds.x[keep], y=np.zeros(keep.sum(), np.int64),
                                      n_classes=1, ids=ids[keep]), cfg))
    for name in ("l", "val", "test", "u"):
        np.testing.assert_array_equal(alone[name], base[name][ds.y[base[name]] == 2],
                                      err_msg=name)


@pytest.mark.parametrize(("counts", "n_unlabeled", "lpc", "n_blocks", "n_shards"), [
    ([60, 45, 50], 40, 4, 1, 1), ([60, 45, 50], 40, 4, 7, 3), ([30, 300, 12], 0, 2, 5, 4),
    ([25, 25], 500, 0, 3, 2)])
def test_the_split_planned_over_blocks_is_the_in_memory_split(
        counts: list[int], n_unlabeled: int, lpc: int, n_blocks: int, n_shards: int) -> None:
    """plan_split's cuts (a radix select over blocks of rows, as the Ray tasks run it) put
    every row where split_indices puts it: the same part, the same shard of the pool, and in
    the same order within it (the keys' order)."""
    ds = _synthetic(counts, n_unlabeled)
    ids = np.arange(len(ds.y)) * 7 + (np.arange(len(ds.y)) // 50 << 32)
    ds = replace(ds, ids=ids)
    cfg = DataConfig(labels_per_class=lpc, val_per_class=2, test_fraction=0.2, seed=3,
                     n_shards=n_shards)
    sp = make_split(ds, cfg)
    keys = split_keys(ids, cfg.seed)
    blocks = np.array_split(np.random.default_rng(1).permutation(len(ids)), n_blocks)

    def run(fn, **kw):
        return [fn(keys[b], ds.y[b], **kw) for b in blocks]

    counts_ = np.bincount(ds.y[ds.y >= 0], minlength=ds.n_classes)
    cuts = plan_split(run, counts_, bool((ds.y < 0).any()), len(ids), cfg)
    part = cuts.part(keys, ds.y)
    for name, p in (("l", LABELED), ("val", VAL), ("test", TEST)):
        np.testing.assert_array_equal(np.sort(ids[part == p]), np.sort(ids[_parts(sp)[name]]))
    assert cuts.n_pool == len(sp.idx_u) == (part == POOL).sum()
    pool = np.flatnonzero(part == POOL)
    in_order = pool[np.argsort(keys[pool])]
    np.testing.assert_array_equal(ids[in_order], sp.idx_u)  # the pool in the same order
    shard_of = cuts.shard(keys[in_order])
    for s, (a, b) in enumerate(shard_bounds(len(sp.idx_u), n_shards)):
        assert (shard_of[a:b] == s).all()


def test_the_pool_shards_are_class_balanced() -> None:
    """The pool is in key order, not in the data's order: a file sorted by class still gives
    every shard each class."""
    y = np.repeat(np.arange(4), 500)  # sorted by class
    ds = Dataset("sorted", np.arange(len(y), dtype=np.float32)[:, None], y, 4)
    sp = make_split(ds, DataConfig(labels_per_class=5, val_per_class=5))
    for part in shard(sp.y_u, 4):
        counts = np.bincount(part, minlength=4)
        assert counts.min() > 0.8 * counts.mean(), counts


def test_digits_split_counts_per_class(digits: Dataset) -> None:
    cfg = DataConfig(labels_per_class=4, val_per_class=3)
    sp = make_split(digits, cfg)
    assert sp.n_classes == 10
    assert sp.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(np.bincount(sp.y_l, minlength=10), np.full(10, 4))
    np.testing.assert_array_equal(np.bincount(sp.y_val, minlength=10), np.full(10, 3))
    # rows of the split are the dataset's rows
    np.testing.assert_array_equal(sp.x_l, digits.x[sp.idx_l])
    np.testing.assert_array_equal(sp.y_u, digits.y[sp.idx_u])
    assert len(np.intersect1d(sp.idx_l, sp.idx_u)) == 0
    n_total = len(sp.y_l) + len(sp.y_u) + len(sp.y_val) + len(sp.y_test)
    assert n_total == len(digits.y)


def test_split_parts_are_disjoint_and_cover_every_row() -> None:
    counts = [40, 25, 33]
    ds = _synthetic(counts, n_unlabeled=0)
    cfg = DataConfig(labels_per_class=3, val_per_class=2, test_fraction=0.2)
    sp = make_split(ds, cfg)
    parts = _parts(sp)
    everything = np.concatenate(list(parts.values()))
    assert len(everything) == len(ds.y)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(ds.y)))  # disjoint, cover
    np.testing.assert_array_equal(parts["l"], sp.idx_l)
    np.testing.assert_array_equal(parts["u"], sp.idx_u)
    # labels travel with their rows
    for name, y in (("l", sp.y_l), ("u", sp.y_u), ("val", sp.y_val), ("test", sp.y_test)):
        np.testing.assert_array_equal(y, ds.y[parts[name]])
    # per-class counts
    for c, n_c in enumerate(counts):
        n_test = round(n_c * cfg.test_fraction)
        assert (sp.y_l == c).sum() == cfg.labels_per_class
        assert (sp.y_val == c).sum() == cfg.val_per_class
        assert (sp.y_test == c).sum() == n_test
        assert (sp.y_u == c).sum() == n_c - n_test - cfg.val_per_class - cfg.labels_per_class


def test_val_per_class_zero_gives_an_empty_validation_split() -> None:
    sp = make_split(_synthetic([20, 20]), DataConfig(labels_per_class=2, val_per_class=0))
    assert len(sp.y_val) == 0
    assert np.bincount(sp.y_l).tolist() == [2, 2]


# -- user .npz files -----------------------------------------------------------------------


def _write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


def test_npz_unlabeled_rows_all_go_to_the_unlabeled_pool(tmp_path: Path) -> None:
    ds0 = _synthetic([30, 30, 30], n_unlabeled=25, d=4, seed=3)
    path = _write_npz(tmp_path / "mine.npz", x=ds0.x, y=ds0.y)
    cfg = DataConfig(dataset=path, labels_per_class=2, val_per_class=2, n_shards=3)
    ds = load_dataset(cfg)
    assert ds.n_classes == 3
    np.testing.assert_array_equal(ds.y, ds0.y)
    sp = make_split(ds, cfg)
    unlabeled_rows = np.where(ds0.y == -1)[0]
    assert np.isin(unlabeled_rows, sp.idx_u).all()
    assert np.all(sp.y_u[np.isin(sp.idx_u, unlabeled_rows)] == -1)
    assert (sp.y_u == -1).sum() == len(unlabeled_rows)
    for y in (sp.y_l, sp.y_val, sp.y_test):
        assert (y >= 0).all()
    np.testing.assert_array_equal(_rows(sp.x_u), sp.idx_u)


def test_npz_uint8_images_are_scaled_and_given_a_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 5, 5)).astype(np.uint8)
    y = np.repeat(np.arange(3), 4)
    ds = load_dataset(DataConfig(dataset=_write_npz(tmp_path / "img.npz", x=x, y=y)))
    assert ds.x.shape == (12, 1, 5, 5)
    assert ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x[:, 0], x / 255.0, rtol=1e-6)


# -- input errors --------------------------------------------------------------------------


def test_unknown_dataset_name() -> None:
    with pytest.raises(DataError, match=r"data\.dataset='nosuchset'") as e:
        load_dataset(DataConfig(dataset="nosuchset"))
    assert "digits" in str(e.value)  # lists what is allowed


def test_missing_npz_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="file not found") as e:
        load_dataset(DataConfig(dataset=path))
    assert path in str(e.value)


def test_npz_without_y(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "noy.npz", x=np.zeros((4, 2)), labels=np.zeros(4))
    with pytest.raises(DataError, match=r"missing arrays \['y'\]") as e:
        load_dataset(DataConfig(dataset=path))
    assert "labels" in str(e.value)  # says what it found


def test_npz_with_mismatched_lengths(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "len.npz", x=np.zeros((10, 2)), y=np.zeros(9, np.int64))
    with pytest.raises(DataError, match="x has 10 rows but y has 9"):
        load_dataset(DataConfig(dataset=path))


def test_npz_with_nan_features(tmp_path: Path) -> None:
    x = np.ones((8, 3), np.float32)
    x[5, 1] = np.nan
    x[6, 0] = np.inf
    path = _write_npz(tmp_path / "nan.npz", x=x, y=np.arange(8) % 2)
    with pytest.raises(DataError, match=r"x has NaN/inf values in 2 rows \(first: \[5, 6\]\)"):
        load_dataset(DataConfig(dataset=path))


def test_npz_labels_of_any_integers_and_strings_map_to_classes(tmp_path: Path) -> None:
    y = np.array([0, 1, -1, -2, 1, -5])  # -1 is unlabeled; -2 and -5 are classes like any
    ds = load_dataset(DataConfig(dataset=_write_npz(tmp_path / "neg.npz", x=np.zeros((6, 2)),
                                                    y=y)))
    assert list(ds.classes) == [-5, -2, 0, 1]
    assert list(ds.y) == [2, 3, -1, 1, 3, 0]
    names = np.array(["cat", "", "dog", "cat"])  # "" is unlabeled
    ds = load_dataset(DataConfig(dataset=_write_npz(tmp_path / "s.npz", x=np.zeros((4, 2)),
                                                    y=names)))
    assert list(ds.classes) == ["cat", "dog"] and list(ds.y) == [0, -1, 1, 0]


def test_npz_with_non_integer_float_labels(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "frac.npz", x=np.zeros((3, 2)), y=np.array([0.0, 1.5, 1.0]))
    with pytest.raises(DataError, match=r"non-integer numbers \(e\.g\. 1\.5\)"):
        load_dataset(DataConfig(dataset=path))


def test_labels_per_class_larger_than_a_class() -> None:
    ds = _synthetic([30, 6, 30])
    cfg = DataConfig(labels_per_class=5, val_per_class=2, test_fraction=0.2)
    with pytest.raises(DataError, match=r"data\.labels_per_class=5: class 1 has 6 labeled rows"):
        make_split(ds, cfg)
    make_split(ds, DataConfig(labels_per_class=3, val_per_class=2, test_fraction=0.2))  # fits


def test_labels_per_class_larger_than_a_digits_class(digits: Dataset) -> None:
    with pytest.raises(DataError, match=r"data\.labels_per_class=1000"):
        make_split(digits, DataConfig(labels_per_class=1000))


def test_more_shards_than_unlabeled_rows() -> None:
    ds = _synthetic([10, 10])
    cfg = DataConfig(labels_per_class=3, val_per_class=2, test_fraction=0.2)  # 3 left per class
    assert len(make_split(ds, cfg).y_u) == 6
    with pytest.raises(DataError, match=r"data\.n_shards=7: more shards than unlabeled rows"):
        make_split(ds, DataConfig(labels_per_class=3, val_per_class=2, test_fraction=0.2,
                                  n_shards=7))
    make_split(ds, DataConfig(labels_per_class=3, val_per_class=2, test_fraction=0.2,
                              n_shards=6))


# -- sharding ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(10, 1), (10, 3), (10, 10), (1338, 4), (7, 2), (1, 1)])
def test_shard_bounds_cover_all_rows_once_in_order(n: int, k: int) -> None:
    bounds = shard_bounds(n, k)
    assert len(bounds) == k
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, stop), (start, _) in itertools.pairwise(bounds):
        assert stop == start  # contiguous, no gap or overlap
    sizes = [b - a for a, b in bounds]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1  # near-equal


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_shard_concatenates_back_to_the_input(k: int) -> None:
    x = np.arange(17 * 2).reshape(17, 2)
    parts = shard(x, k)
    assert len(parts) == k
    np.testing.assert_array_equal(np.concatenate(parts), x)


@pytest.mark.parametrize(("n", "k"), [(5, 6), (5, 0)])
def test_shard_bounds_rejects_bad_shard_counts(n: int, k: int) -> None:
    with pytest.raises(DataError, match=rf"data\.n_shards={k}"):
        shard_bounds(n, k)


@pytest.mark.parametrize(("labels", "want"), [(1, (0, 0, 1)), (2, (0, 0, 2)), (5, (1, 1, 3)),
                                               (10, (2, 2, 6)), (40, (8, 5, 27))])
def test_a_users_labels_are_all_used(labels: int, want: tuple[int, int, int]) -> None:
    """data.labels_per_class=0 on data with unlabeled rows: every label trains or measures;
    none is hidden in the pool, and held-out splits never eat the labels of a small class."""
    rng = np.random.default_rng(0)
    y = np.full(300, -1)
    for c in range(3):
        y[rng.choice(np.where(y == -1)[0], labels, replace=False)] = c
    ds = Dataset("user", rng.normal(size=(300, 4)).astype(np.float32), y, 3)
    sp = make_split(ds, DataConfig(labels_per_class=0, n_shards=1))
    n_test, n_val, n_lab = want
    assert (len(sp.y_test), len(sp.y_val), len(sp.y_l)) == (3 * n_test, 3 * n_val, 3 * n_lab)
    assert len(sp.x_u) == (y == -1).sum()
    assert (sp.y_u == -1).all()  # no label hidden in the pool


def test_labels_per_class_zero_on_fully_labeled_data_is_the_benchmark_default(
        digits: Dataset) -> None:
    from raysl.data import BENCHMARK_LABELS_PER_CLASS

    auto = make_split(digits, DataConfig(labels_per_class=0))
    five = make_split(digits, DataConfig(labels_per_class=BENCHMARK_LABELS_PER_CLASS))
    np.testing.assert_array_equal(auto.idx_l, five.idx_l)
    np.testing.assert_array_equal(auto.idx_u, five.idx_u)
