"""``raysl bench backends`` end to end, in this process (no Ray): its table, and that a rerun
of the same command reuses its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysl.bench.backends import main, parse_gmm
from raysl.calibration import T_MAX


def test_parse_gmm_variants() -> None:
    assert parse_gmm("embedding:3") == ("gmm embedding k=3", {
        "backend.gmm.features": "embedding", "backend.gmm.components_per_class": 3})
    assert parse_gmm("pca:1:32")[1]["backend.gmm.pca_dim"] == 32
    with pytest.raises(ValueError):
        parse_gmm("embedding")


def test_bench_backends_quick_prints_ece_before_and_after_calibration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], one_torch_thread: None) -> None:
    argv = ["--quick", "--local", "--backends", "gmm,self", "--gmm", "pca:1,embedding:1",
            "--set", "train.min_steps=200", "--set", "train.hidden=32", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == [
        "labelspreading (knn 7)", "gmm pca k=1", "sklearn GaussianMixture (gmm pca k=1)",
        "gmm embedding k=1", "sklearn GaussianMixture (gmm embedding k=1)", "self"]
    for r in rows:
        assert 0.5 < r["accuracy"] <= 1.0 and 0.5 <= r["t"] <= T_MAX
        assert 0.0 <= r["ece_cal"] <= 1.0 and 0.0 <= r["ece"] <= 1.0
    # scikit-learn ran raysl's number of EM rounds, on the same features
    assert rows[2]["rounds"] == rows[1]["rounds"] >= 1 and rows[2]["sklearn_of"] == "gmm pca k=1"
    table = [ln for ln in out.splitlines() if ln.startswith("| gmm embedding k=1 | digits")]
    assert len(table) == 3  # the summary, the per-threshold and the scikit-learn tables
    cells = table[2].split("|")[1:-1]  # gmm, dataset, seeds, rounds, 3 × s, acc %, acc %
    assert len(cells) == 9 and float(cells[3]) == rows[3]["rounds"]
    assert 0 <= rows[3]["em_seconds"] <= rows[3]["seconds"]
    assert float(cells[8]) == pytest.approx(100 * rows[4]["accuracy"], abs=0.06)
    assert (tmp_path / "table.md").read_text().count("| self | digits") == 2
    assert main(argv) == 0  # again: every row is found, nothing is refitted
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 6
    assert "[bench] digits" not in capsys.readouterr().out
