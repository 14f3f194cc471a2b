"""``raysl bench robustness``: the table, the data files and the scikit-learn columns (no Ray,
no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raysl.bench import robustness as rb
from raysl.config import DataConfig
from raysl.data import Dataset, load_file, make_split
from raysl.errors import ConfigError, DataError


def _rows(ds: str, method: str, accs: list[float], n_labeled: int = 30) -> list[dict[str, Any]]:
    return [{"dataset": ds, "method": method, "seed": s, "test_accuracy": a, "seconds": 1.0,
             "n_labeled": n_labeled} for s, a in enumerate(accs)]


def _line(md: str, ds: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {ds} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_aggregates_flags_harm_and_shows_missing_datasets() -> None:
    rows = (
        # "a": default beats everything, 2 points above its baseline
        _rows("a", "raysl default", [0.90, 0.92, 0.94]) + _rows("a", "raysl baseline", [0.90] * 3)
        + _rows("a", "LogReg", [0.80] * 3) + _rows("a", "LabelSpreading", [0.85] * 3)
        + _rows("a", "SelfTraining", [0.70] * 3) + _rows("a", "oracle", [0.99] * 3)
        # "b": default 1 point below its baseline and below LogReg; only 2 seeds of default
        + _rows("b", "raysl default", [0.79, 0.79]) + _rows("b", "raysl baseline", [0.80] * 3)
        + _rows("b", "LogReg", [0.81] * 3)
    )
    md = rb.table(rows, ["a", "b", "missing"], {"a": 10, "b": 10, "missing": 10}, seeds=3)
    a, b, missing = _line(md, "a"), _line(md, "b"), _line(md, "missing")
    assert a[:4] == ["a", "30 (10/class)", "92.0 ± 2.0", "90.0 ± 0.0"]  # std with ddof=1
    assert a[-2:] == ["85.0 (LabelSpreading)", "+2.0"]
    assert b[2] == "79.0 ± 0.0 (n=2)" and b[4] == "81.0 ± 0.0"
    assert b[5:8] == ["n/a"] * 3 and b[-2:] == ["81.0 (LogReg)", "-1.0"]
    assert missing == ["missing", "10/class"] + ["n/a"] * 8
    assert "beats the best scikit-learn column on 1 of 2 datasets" in md
    assert "baseline on: b (-1.0)." in md
    assert "Mean seconds per run: raysl default 1.0" in md


def test_table_without_harm_says_none() -> None:
    rows = _rows("a", "raysl default", [0.9]) + _rows("a", "raysl baseline", [0.904])
    md = rb.table(rows, ["a"], {"a": 5}, seeds=1)
    assert "baseline on: none." in md and "on 0 of 0 datasets" in md


@pytest.mark.parametrize("name", sorted(rb.SKLEARN_TABLES))
def test_sklearn_npz_is_unscaled_float32_and_int64(name: str, tmp_path: Path) -> None:
    import sklearn.datasets

    d = getattr(sklearn.datasets, rb.SKLEARN_TABLES[name])()
    path = rb.write_sklearn_npz(name, tmp_path / f"{name}.npz")
    with np.load(path) as f:
        assert sorted(f.files) == ["x", "y"]
        assert f["x"].dtype == np.float32 and f["y"].dtype == np.int64
        np.testing.assert_array_equal(f["x"], d.data.astype(np.float32))
        np.testing.assert_array_equal(f["y"], d.target)
    assert not [p for p in tmp_path.iterdir() if p.name != f"{name}.npz"]  # no temp files left
    ds = load_file(str(path))  # raysl reads it as a user's file, unchanged
    np.testing.assert_array_equal(ds.x, d.data.astype(np.float32))


def test_stratified_subsample_is_stratified_and_deterministic() -> None:
    y = np.repeat(np.arange(3), [600, 300, 100])
    x = np.arange(len(y), dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    xs, ys = rb.stratified_subsample(x, y, 100, seed=0)
    assert np.bincount(ys).tolist() == [60, 30, 10]
    np.testing.assert_array_equal(y[xs[:, 0].astype(int)], ys)  # rows stay paired
    assert np.all(np.diff(xs[:, 0]) > 0)  # original order, no repeats
    xs2, ys2 = rb.stratified_subsample(x, y, 100, seed=0)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    assert not np.array_equal(xs, rb.stratified_subsample(x, y, 100, seed=1)[0])


def test_fashion_npz_from_a_synthetic_dataset(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 50)
    x = rng.random((500, 1, 28, 28), dtype=np.float32)
    fake = Dataset("fashion_mnist", x, y, 10, x[:20], y[:20])
    monkeypatch.setattr("raysl.data.load_dataset", lambda cfg: fake)
    monkeypatch.setattr(rb, "FASHION_ROWS", 200)
    path = tmp_path / "data" / rb.FASHION_FILE
    assert rb.prepare_data("fashion_mnist", tmp_path, print)
    assert rb.data_value("fashion_mnist", tmp_path) == str(path)
    with np.load(path) as f:
        assert f["x"].shape == (200, 1, 28, 28) and f["x"].dtype == np.float32
        assert f["y"].dtype == np.int64 and np.bincount(f["y"]).tolist() == [20] * 10
        assert 0.0 <= f["x"].min() and f["x"].max() <= 1.0


def test_missing_fashion_data_is_skipped_with_a_message(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(cfg: DataConfig) -> Dataset:
        raise DataError("data.dataset='fashion_mnist': not found")

    monkeypatch.setattr("raysl.data.load_dataset", missing)
    logged: list[str] = []
    assert not rb.prepare_data("fashion_mnist", tmp_path, logged.append)
    assert "fashion_mnist: skipped" in logged[0] and "not found" in logged[0]
    assert not (tmp_path / "data" / rb.FASHION_FILE).exists()


def test_sklearn_columns_on_iris(tmp_path: Path) -> None:
    """Every column runs on iris and LogReg learns it (mean of 3 splits: 30 test rows each,
    one split can miss six)."""
    path = rb.write_sklearn_npz("iris", tmp_path / "iris.npz")
    logreg = []
    for seed in range(3):
        cfg = DataConfig(dataset=str(path), labels_per_class=5, seed=seed)
        accs = {m: f(make_split(load_file(str(path)), cfg)) for m, f in rb.SKLEARN.items()}
        assert all(0.0 <= a <= 1.0 for a in accs.values()), accs
        logreg.append(accs["LogReg"])
    assert np.mean(logreg) > 0.8, logreg


def test_bad_input_fails_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "rb"
    with pytest.raises(SystemExit) as e:
        rb.main(["--datasets", "nope", "--out", str(out)])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match=r"select\.threshold"):
        rb.main(["--datasets", "iris", "--set", "select.threshold=1.5", "--out", str(out)])
    assert not out.exists()


def test_registered_in_cli() -> None:
    from raysl.cli import BENCHES

    assert BENCHES["robustness"] == "raysl.bench.robustness"
