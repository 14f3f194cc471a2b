"""``raysl bench scale``: the data it writes, its table and targets, and one tiny end-to-end run
(each row count in a process of its own, as the bench runs it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysl.bench import scale
from raysl.errors import ConfigError


def test_synthetic_data_is_a_table_a_reader_takes_and_is_reused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.setattr(scale, "FILE_ROWS", 700)
    src = scale.Source("synthetic", 5)
    folder = scale.write_dataset(tmp_path / "d", src, 2000, 0.1)
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) == 3  # 700 + 700 + 600 rows
    t = pq.read_table(parts)
    assert t.num_rows == 2000 and t.column_names == ["f0", "f1", "f2", "f3", "f4", "y"]
    y = t.column("y").to_numpy()
    assert 0.05 < (y >= 0).mean() < 0.15 and set(np.unique(y)) <= set(range(-1, 10))
    before = parts[0].stat().st_mtime_ns
    scale.write_dataset(tmp_path / "d", src, 2000, 0.1)  # same rows: the files are kept
    assert parts[0].stat().st_mtime_ns == before
    scale.write_dataset(tmp_path / "d", src, 1000, 0.1)  # other rows: rewritten
    assert pq.read_table(sorted(folder.glob("part-*.parquet"))).num_rows == 1000


def _result(rows: int, rss: float, pl_seconds: float) -> dict[str, Any]:
    stage = {"rss_peak": rss, "store_peak": 1e8}
    return {"rows": rows, "nodes": 1, "workers": 2, "peak_rss": rss, "stages": [
        {"stage": scale.STAGES[0], "rows": rows, "seconds": 2.0, **stage},
        {"stage": scale.STAGES[1], "rows": rows, "seconds": pl_seconds, "rounds": 11,
         "selected": rows // 2, **stage},
        {"stage": scale.STAGES[2], "rows": rows, "seconds": 4.0, "steps": 10, **stage},
        {"stage": scale.STAGES[3], "rows": rows, "seconds": 1.0, "rss_peak": None,
         "store_peak": None}]}


def test_targets_pass_and_fail_on_the_ratios() -> None:
    flat = scale.targets([_result(1000, 1e9, 1.0), _result(10000, 1.1e9, 12.0)])
    assert [v for _, _, v in flat][:2] == ["PASS", "PASS"]  # RSS 1.1x; rows/s 10/12 = 0.83
    grows = scale.targets([_result(1000, 1e9, 1.0), _result(10000, 5e9, 20.0)])
    assert [(m, v) for _, m, v in grows][:2] == [("5.00", "FAIL"), ("0.50", "FAIL")]
    assert scale.targets([_result(1000, 1e9, 1.0)])[0][2] == "n/a"
    # the Train ranks' memory, when the runs recorded it: the largest rank's, as a ratio
    small, large = _result(1000, 1e9, 1.0), _result(10000, 1.1e9, 12.0)
    for r, anon in ((small, (2e8, 3e8)), (large, (5e8, 6e8))):
        r["ranks"] = [{"x_p": 10, "x_u": 20, "on_disk": ["x_p"],
                       "read_seconds": {"x_p": 1.25, "x_u": 2.0},
                       "memory": {"RssAnon": a, "RssFile": 1e8, "VmHWM": 9e8}} for a in anon]
        r["actors"] = [{"rows": 15, "on_disk": False,
                        "memory": {"RssAnon": anon[0] / 2, "RssFile": 1e8, "VmHWM": 9e8}}]
    assert [t[1:] for t in scale.targets([small, large])[-2:]] == [("2.50", "-"), ("2.00", "-")]
    text = scale.table([small, large])
    assert ("| 10,000 | Train rank 1 | 10 kept / 20 pool | disk: x_p | 3.2 | 0.60 | 0.10 | 0.90 |"
            in text), text  # read s: both fields' reads
    assert "| 1,000 | shard actor 0 | 15 | memory |  | 0.10 | 0.10 | 0.90 |" in text, text


def test_bad_options_fail_before_any_work(tmp_path: Path) -> None:
    for argv, needle in ((["--rows", "10"], "at least 1000"), (["--rows", "a,b"], "row counts"),
                         (["--labeled", "1.5"], r"must be in \(0, 1\)"),
                         (["--set", "train.epochs=0"], "train.epochs")):
        with pytest.raises(ConfigError, match=needle):
            scale.main([*argv, "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()


NUM = r"[\d,.]+"


@pytest.mark.ray
def test_bench_scale_end_to_end_at_tiny_sizes(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Two row counts, each in a fresh process that starts its own Ray (no session fixture):
    about 60-75 s on this 2-core machine, most of it two Ray start-ups."""
    rc = scale.main(["--rows", "2000,4000", "--source", "synthetic", "--dim", "8",
                     "--labeled", "0.05", "--gmm-rounds", "3", "--set", "train.num_workers=0",
                     "--out", str(tmp_path / "bench")])
    assert rc == 0
    out = capsys.readouterr().out
    for n in ("2,000", "4,000"):
        for stage in (*scale.STAGES, "whole run"):
            row = next((ln for ln in out.splitlines()
                        if ln.startswith(f"| {n} | {stage}")), None)
            assert row is not None, f"no row for {n} {stage}:\n{out}"
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert re.fullmatch(NUM, cells[2]) and re.fullmatch(NUM, cells[3]), row  # s, rows/s
            if stage != "training loop":
                assert re.fullmatch(NUM, cells[4]) and re.fullmatch(NUM, cells[5]), row
                assert float(cells[4]) > 0.1  # a Python driver with torch and Ray: > 100 MB
    assert re.search(rf"driver peak RSS at 4,000 / 2,000 ≤ 1.2 \| {NUM} \| (PASS|FAIL)", out)
    assert re.search(rf"pseudo-labelling rows/s at 4,000 / 2,000 ≥ 0.8 \| {NUM} \| "
                     "(PASS|FAIL)", out)
    assert "synthetic Gaussian mixture" in out
    assert (tmp_path / "bench" / "runs" / "table.md").is_file()
