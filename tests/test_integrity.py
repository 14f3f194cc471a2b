"""Integrity of outputs: every stage's files are checksummed; a truncated or corrupt file is
reported, removed and its stage redone, ending with the same metrics as a clean run; the final
model.pt is only ever a verified copy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from raysl import pipeline
from raysl.config import Config, apply_overrides

FAST = {"ray.enabled": False, "train.epochs": 2, "train.min_steps": 40, "train.hidden": 32,
        "backend.name": "gmm", "backend.gmm.max_iter": 5, "backend.gmm.pca_dim": 4}


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small vector dataset (an MLP trains in a blink): scikit-learn's wine as a user file."""
    import numpy as np
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    path = tmp_path_factory.mktemp("data") / "wine.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def _cfg(wine: str) -> Config:
    return apply_overrides(Config(), {**FAST, "data.dataset": wine})


def _figures(m: dict) -> tuple:
    return (m["baseline"]["test_accuracy"], m["pseudo_labels"]["n_selected"],
            m["pseudo_labels"]["precision"], m["joint"]["test_accuracy"],
            m["final"]["model"], m["final"]["test_accuracy"])


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, wine: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean") / "run"
    return out, pipeline.run(_cfg(wine), out)


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


# which file, and which stage must be redone (its metrics' "cached" flag turns False)
CASES = [
    ("cache/labels-gmm-*/part-00001.npz", "pseudo_labels"),
    ("cache/labels-gmm-*/meta.npz", "pseudo_labels"),
    ("baseline/model.pt", "baseline"),
    ("baseline/result.json", "baseline"),
    ("joint/model.pt", "joint"),
    ("joint/result.json", "joint"),
    ("model.pt", None),  # the final copy: simply installed again from the verified stage
]


@pytest.mark.parametrize(("pattern", "redone"), CASES, ids=[c[0] for c in CASES])
def test_a_truncated_output_is_redone_with_the_same_result(
        pattern: str, redone: str | None, clean: tuple[Path, dict], wine: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(clean[0], out)  # a finished run
    (target,) = out.glob(pattern)
    _truncate(target)
    with caplog.at_level(logging.WARNING, logger="raysl"):
        again = pipeline.run(_cfg(wine), out)
    assert _figures(again) == _figures(clean[1])
    for stage in ("baseline", "pseudo_labels", "joint"):
        assert again[stage]["cached"] is (stage != redone), stage
    if redone is not None:
        assert "corrupt or incomplete" in caplog.text
    # out/model.pt is the verified copy of the chosen stage's model
    src = out / again["final"]["model"] / "model.pt"
    assert (out / "model.pt").read_bytes() == src.read_bytes()
    record = json.loads((out / again["final"]["model"] / "result.json").read_text())
    from raysl.io import sha256_file

    assert sha256_file(out / "model.pt") == record["files"]["model.pt"]


@pytest.mark.parametrize("stages", ["all", "train"])
def test_a_truncated_pseudo_label_file_is_written_again(stages: str, clean: tuple[Path, dict],
                                                        wine: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "run"
    shutil.copytree(clean[0], out)
    _truncate(out / "pseudo_labels.parquet" / "part-00000.parquet")
    again = pipeline.run(_cfg(wine), out, stages=stages)
    assert _figures(again) == _figures(clean[1])
    assert pq.read_table(out / "pseudo_labels.parquet").num_rows == len(
        pq.read_table(clean[0] / "pseudo_labels.parquet"))
