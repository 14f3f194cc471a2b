"""How raysl meets Ray: no side effects at import, settings for Ray's processes in the job's
runtime_env, no private Ray imports, no test hooks in production signatures, and progress
through the "raysl" logger (on the driver's console, once, without Ray Train's report lines).
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raysl.config import DataConfig, RayConfig, TrainConfig
from raysl.train import TrainData

ROOT = Path(__file__).resolve().parents[1]


def test_importing_raysl_leaves_the_environment_alone() -> None:
    """Every raysl module imported in a fresh process (no RAY_* variables) adds nothing to
    os.environ beyond what importing Ray, torch and scikit-learn does (sklearn sets KMP_*)."""
    code = (
        "import importlib, os, pkgutil\n"
        "import ray, ray.train, ray.train.torch, ray.tune, sklearn, torch  # theirs first\n"
        "import raysl\n"
        "before = dict(os.environ)\n"
        "names = [m.name for m in pkgutil.walk_packages(raysl.__path__, 'raysl.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "assert 'raysl.distributed.session' in names, names\n"
        "changed = {k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k)}\n"
        "print(sorted(changed))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """ray.init recorded, not run (and Ray not yet initialized)."""
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TRAIN_ENABLE_PRINT_PATCH",
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.delenv(k, raising=False)
    return calls


def test_ensure_ray_sets_rays_process_env_through_the_runtime_env(
        init_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    from raysl.distributed.session import RAY_ENV, ensure_ray, runtime_env

    before = dict(os.environ)
    assert ensure_ray(RayConfig(num_cpus=2))
    (local,) = init_calls
    assert local["address"] == "local" and local["num_cpus"] == 2
    env = local["runtime_env"]["env_vars"]
    assert {k: env[k] for k in RAY_ENV} == RAY_ENV
    # Ray Train's PlacementGroupCleaner is pointed at this Ray's own State API
    assert env["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{local['dashboard_port']}"
    assert local["dashboard_host"] == "127.0.0.1"
    assert dict(os.environ) == before  # nothing set in this process

    init_calls.clear()
    assert ensure_ray(RayConfig(address="10.0.0.5:6379"))
    (joined,) = init_calls
    assert joined["address"] == "10.0.0.5:6379"
    assert joined["runtime_env"]["env_vars"]["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert "RAY_ADDRESS" not in runtime_env(address="auto")["env_vars"]
    assert "RAY_ADDRESS" not in runtime_env(address="ray://head:10001")["env_vars"]

    # a variable the driver's environment sets wins (Ray Train forwards it itself)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in runtime_env()["env_vars"]
    assert dict(os.environ) == {**before, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _private_ray(name: str) -> bool:
    """ray.<...>._internal / ray._private / any _-prefixed (not dunder) part under ray."""
    parts = name.split(".")
    return parts[0] == "ray" and any(p.startswith("_") and not p.startswith("__")
                                     for p in parts[1:])


def test_raysl_uses_no_private_ray_module() -> None:
    found = []
    for path in sorted((ROOT / "raysl").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [n] if (n := _dotted(node)) else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}"
                      for n in names if _private_ray(n)]
    assert not found, "\n".join(found)
    assert _private_ray("ray.train.v2._internal.execution.context")
    assert _private_ray("ray._private.services") and not _private_ray("ray.train.torch")


def test_fault_injection_is_not_in_production_code() -> None:
    import importlib.util

    from raysl.distributed.trainer import train_classifier

    assert "fault" not in inspect.signature(train_classifier).parameters
    assert importlib.util.find_spec("raysl.distributed.faults") is None
    hits = [p for p in (ROOT / "raysl").rglob("*.py") if "Fault" in p.read_text()]
    assert not hits, hits


# -- progress of a Ray Train run ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data():
    from raysl.data import load_dataset, make_split

    dc = DataConfig()
    split = make_split(load_dataset(dc), dc)
    e = np.zeros((0, *split.input_shape), np.float32)
    data = TrainData(split.x_l, split.y_l, e, np.zeros(0, np.int64), np.zeros(0, np.float32),
                     split.x_val, split.y_val, len(split.x_u))
    return data, split.input_shape, split.n_classes


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_progress_goes_through_the_raysl_logger(tiny_data, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Local mode (the loop in this process): one INFO record per epoch on "raysl", nothing
    printed, and the driver's logging left as it was."""
    from raysl.distributed.trainer import train_classifier

    data, shape, n_classes = tiny_data
    root_level, handlers = logging.getLogger().level, list(logging.getLogger("raysl").handlers)
    caplog.set_level(logging.INFO, logger="raysl")
    train_classifier(data, TrainConfig(epochs=2, num_workers=0, min_steps=0), shape, n_classes,
                     tmp_path, "local", verbose=True)
    msgs = [r.getMessage() for r in caplog.records if r.name == "raysl"]
    assert [m.split(" loss=")[0] for m in msgs] == ["[local] epoch 1/2", "[local] epoch 2/2"]
    assert "epoch" not in capsys.readouterr().out
    assert logging.getLogger().level == root_level
    assert logging.getLogger("raysl").handlers == handlers


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_worker_progress_reaches_the_driver_console_once(tiny_data, tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """A Ray Train worker's progress reaches the driver's console (Ray forwards the worker's
    stdout), each epoch once (no print patch), without Ray Train's per-report INFO lines."""
    from raysl.distributed.trainer import train_classifier

    data, shape, n_classes = tiny_data
    cfg = TrainConfig(epochs=3, num_workers=1, cpus_per_worker=0.5, min_steps=0)
    train_classifier(data, cfg, shape, n_classes, tmp_path, "console", verbose=True)
    text, deadline = "", time.time() + 15
    while time.time() < deadline:  # worker logs reach the driver asynchronously
        o, e = capfd.readouterr()
        text += o + e
        if "[console] epoch 3/3" in text:
            break
        time.sleep(0.5)
    time.sleep(1)
    text += "".join(capfd.readouterr())
    for k in (1, 2, 3):
        assert text.count(f"[console] epoch {k}/3 ") == 1, text[-3000:]
    assert "Reporting training result" not in text, text[-3000:]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_the_sessions_settings_reach_rays_processes() -> None:
    """The session's runtime_env (raysl's RAY_ENV) is in the environment of the job's tasks and
    actors, where Ray Train reads it."""
    import ray

    from raysl.distributed.session import RAY_ENV

    @ray.remote(num_cpus=0)
    def env() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in RAY_ENV}

    assert ray.get(env.remote()) == {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}


@pytest.mark.ray
def test_ctrl_c_stops_a_run_in_seconds_and_says_how_to_resume(tmp_path: Path) -> None:
    """SIGINT during Ray Train (whose own handler used to exit 1 with no word): exit 130
    within seconds and a line saying how to resume (that a re-run resumes is
    test_cluster's killed-driver test)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "raysl.cli", "run", "--out", str(out), "--set",
           "train.epochs=200", "--set", "train.min_steps=0", "--set", "train.num_workers=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the baseline trains
            if "epoch 2/200" in line:
                break
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        stopped_in = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert f"run the same command again with --out {out} to resume" in err
    assert stopped_in < 30, stopped_in  # generous on a loaded 2-core machine: it was ~4 s
    assert (out / "config.yaml").is_file() and not (out / "metrics.json").exists()
