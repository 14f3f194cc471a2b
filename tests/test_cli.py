"""The command line fails fast on bad input: a clear message, exit code 2, nothing started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysl.cli import main


def _raysl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raysl.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "select.threshold=1.5"], "select.threshold=1.5: must be in [0.0, 1.0]"),
    (["--set", "data.dataset=nope"], "data.dataset='nope': unknown dataset"),
    (["--set", "backend.name=magic"], "backend.name='magic': unknown backend; allowed: auto, gmm"),
    (["--set", "train.lambda_uu=1"], "unknown config key 'train.lambda_uu'; valid keys:"),
    (["--set", "data.labels_per_class=500"], "data.labels_per_class=500: class 0 has"),
    (["--set", "data.n_shards=5000"], "data.n_shards=5000: more shards than unlabeled rows"),
    (["--config", "missing.yaml"], "--config 'missing.yaml': file not found"),
])
def test_bad_input_fails_before_ray_starts(args: list[str], needle: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import raysl.distributed.session as session

    def no_ray(*_: object, **__: object) -> bool:  # whether or not a session already runs
        raise AssertionError("Ray was about to start")

    monkeypatch.setattr(session, "ensure_ray", no_ray)
    assert main(["run", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "o").exists()  # nothing written


def test_bad_user_data_names_the_problem(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    x[7, 2] = np.nan
    y = np.repeat(np.arange(2), 20)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert main(["run", "--set", f"data.dataset={tmp_path / 'd.npz'}"]) == 2
    assert "NaN/inf" in capsys.readouterr().err


def test_keys_lists_every_config_key() -> None:
    r = _raysl("keys")
    assert r.returncode == 0, r.stderr
    assert "select.threshold = 0.95" in r.stdout
    assert "backend.gmm.pca_dim = 16" in r.stdout


def test_the_command_leaves_the_raysl_logger_as_it_found_it(tmp_path: Path) -> None:
    import logging

    logger = logging.getLogger("raysl")
    before = (list(logger.handlers), logger.level, logger.propagate)
    assert main(["run", "--out", str(tmp_path), "--set", "select.threshold=7"]) == 2
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def _wine_npz(tmp_path: Path) -> str:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    np.savez(tmp_path / "wine.npz", x=x, y=y)
    return str(tmp_path / "wine.npz")


def test_train_honours_select_and_keeps_the_run_config(tmp_path: Path) -> None:
    import json

    import yaml

    out = tmp_path / "run"
    fast = ["--set", "ray.enabled=false", "--set", "train.epochs=2", "--set",
            "train.min_steps=20", "--set", "train.hidden=16", "--set", "backend.name=gmm",
            "--set", "backend.gmm.pca_dim=4", "--set", f"data.dataset={_wine_npz(tmp_path)}"]
    assert main(["pseudo-label", "--out", str(out), *fast]) == 0
    first = json.loads((out / "metrics.json").read_text())
    # only the threshold is given: everything else comes from the run's config.yaml
    assert main(["train", "--out", str(out), "--set", "select.threshold=0.5"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["select"]["threshold"] == 0.5 and saved["train"]["epochs"] == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["pseudo_labels"]["threshold"] == 0.5  # re-selected at 0.5, not the 0.95 rows
    assert m["pseudo_labels"]["n_selected"] >= first["pseudo_labels"]["n_selected"]
    assert m["baseline"]["test_accuracy"] == first["baseline"]["test_accuracy"]
    assert m["pseudo_labels"]["cached"] is True  # no refit
    # a train that does not match the run is refused and leaves config.yaml as it was
    before = (out / "config.yaml").read_text()
    assert main(["train", "--out", str(out), "--set", "data.seed=3"]) == 2
    assert (out / "config.yaml").read_text() == before
