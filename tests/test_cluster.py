"""Clusters, jobs and faults: cluster.yaml validates, a job submitted to a local head succeeds,
two nodes share the work, and dying actors, workers and drivers do not lose or corrupt work."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from faults import Fault, FaultyFactory, failing_loop

from raysl import pipeline
from raysl.backends import BACKENDS, FitContext
from raysl.backends.base import LocalExecutor, Shard, ShardWorker, fit
from raysl.config import Config, DataConfig, TrainConfig, apply_overrides, dump_yaml
from raysl.data import load_dataset, make_split, shard
from raysl.train import TrainData

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_configs_validate_against_rays_schema(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    setup = " ".join(raw["setup_commands"])
    assert "ray[default,train,tune]==2.60.0" in setup  # the project's Ray, not a nightly
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the Jobs API stays on loopback
    raw["max_wrokers"] = 3  # a typo must not pass
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(raw))


@pytest.fixture(scope="module")
def split():
    cfg = DataConfig()
    return make_split(load_dataset(cfg), cfg)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_actor_dying_mid_round_is_retried_and_the_fit_is_unchanged(split,
                                                                   tmp_path: Path) -> None:
    from raysl.distributed.actors import RayExecutor

    cfg = apply_overrides(Config(), {"backend.gmm.max_iter": 6})
    ctx = FitContext(split.n_classes, split.input_shape, seed=0)
    shards = [Shard(x, split.x_l, split.y_l, i) for i, x in enumerate(shard(split.x_u, 2))]
    factory = BACKENDS["gmm"]
    clean = fit(factory(cfg.backend, ctx),
                LocalExecutor([ShardWorker(factory, cfg.backend, ctx, s) for s in shards]),
                split.x_l, split.y_l)
    fault = Fault(str(tmp_path / "fired"), at=3, shard=1, exit=True)
    faulty = FaultyFactory(factory, fault)
    with RayExecutor(faulty, cfg.backend, ctx, shards, num_cpus=0.5) as ex:
        survived = fit(faulty(cfg.backend, ctx), ex, split.x_l, split.y_l)
    assert Path(fault.marker).exists(), "the fault never fired"
    # the same fit up to rounding (BLAS thread counts differ between driver and actors)
    np.testing.assert_allclose(survived.objective, clean.objective, rtol=1e-12)
    np.testing.assert_allclose(survived.proba, clean.proba, rtol=0, atol=1e-9)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_train_worker_dying_mid_epoch_restarts_from_checkpoint(split, tmp_path: Path) -> None:
    from raysl.distributed.trainer import train_classifier

    e = np.zeros((0, *split.input_shape), np.float32)
    data = TrainData(split.x_l, split.y_l, e, np.zeros(0, np.int64), np.zeros(0, np.float32),
                     split.x_val, split.y_val, len(split.x_u))
    cfg = TrainConfig(epochs=3, num_workers=2, cpus_per_worker=0.5, min_steps=0)
    args = (data, cfg, split.input_shape, split.n_classes, tmp_path)
    fault = Fault(str(tmp_path / "fired"), at=1, shard=1, exit=True)  # rank 1, epoch 1
    survived = train_classifier(*args, "dies", max_failures=1, loop=failing_loop(fault),
                                verbose=False)
    clean = train_classifier(*args, "clean", verbose=False)
    assert Path(fault.marker).exists(), "the fault never fired"
    assert [h["epoch"] for h in survived.history] == [0, 1, 2]
    assert survived.resumed_from_epoch in (-1, 0)  # -1 only if epoch 0's checkpoint was lost
    for k in clean.state:
        np.testing.assert_array_equal(survived.state[k], clean.state[k], err_msg=k)


def _tiny(overrides: dict[str, object] | None = None) -> Config:
    return apply_overrides(Config(), {"train.epochs": 8, "train.min_steps": 0,
                                      "train.num_workers": 1,
                                      "backend.gmm.max_iter": 5, **(overrides or {})})


def _registered_checkpoint(out: Path) -> bool:
    """True once Ray Train has recorded a joint checkpoint in its manager snapshot (a
    checkpoint directory alone may not be registered yet, and then a resume can't see it)."""
    for snap in out.glob("ray/joint-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):  # being written
            pass
    return False


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_killed_driver_resumes_when_run_again(tmp_path: Path) -> None:
    import ray

    out = tmp_path / "run"
    cfg = _tiny({"ray.address": ray.get_runtime_context().gcs_address})
    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "raysl.cli", "run", "--config",
                             str(tmp_path / "cfg.yaml"), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not _registered_checkpoint(out):  # the joint stage has saved an epoch
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "no joint checkpoint within 240 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()

    m = pipeline.run(cfg, out)
    assert m["baseline"]["cached"] and m["pseudo_labels"]["cached"]
    assert m["joint"]["resumed_from_epoch"] >= 0  # continued, not started over
    assert m["joint"]["epochs"] == cfg.train.epochs
    assert not list(out.rglob("*.tmp")), "half-written files left behind"
    assert json.loads((out / "metrics.json").read_text())["joint"]["test_accuracy"] >= 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Head:
    dashboard: str  # the Jobs / State API address
    gcs_port: int


@contextlib.contextmanager
def _ray_head(num_cpus: int = 2) -> Iterator[Head]:
    """A Ray head of its own, `ray start --head`, on free loopback ports (beside the session's
    Ray). Stopped with SIGTERM to its process group, not `ray stop`, which would stop every Ray
    on the machine; the "latest cluster" file `ray start` writes is put back as it was."""
    from ray._common.utils import get_ray_address_file

    ports = {k: _free_port() for k in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port",
        "node-manager-port", "object-manager-port")}
    latest = Path(get_ray_address_file(None))
    before = latest.read_text() if latest.is_file() else None
    # token auth off on this loopback-only test head, so the client side needs no token
    # (whether this process had read RAY_AUTH_MODE before made the job test order-dependent)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--num-cpus={num_cpus}",
                             "--dashboard-host=127.0.0.1",
                             *[f"--{k}={v}" for k, v in ports.items()]],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield Head(f"http://127.0.0.1:{ports['dashboard-port']}", ports["port"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            # a graceful stop takes ~30 s here; a test head has nothing worth waiting for
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its group only: whatever is left of it
        with contextlib.suppress(OSError):
            if latest.read_text().strip().endswith(f":{ports['port']}"):  # still ours
                if before is None:
                    latest.unlink()
                else:
                    latest.write_text(before)


@pytest.fixture
def local_head() -> Iterator[str]:
    """The Jobs API address of a Ray head of its own (:func:`_ray_head`)."""
    with _ray_head() as head:
        yield head.dashboard


@pytest.mark.ray
def test_job_submitted_to_a_local_head_succeeds(local_head: str, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.time() + 60
    while True:
        try:
            client = JobSubmissionClient(local_head)
            break
        except Exception:
            assert time.time() < deadline, "the head's Jobs API did not come up in 60 s"
            time.sleep(1)
    out = tmp_path / "job-out"
    job = client.submit_job(
        entrypoint="python jobs/run.py --config jobs/configs/digits.yaml "
                   "--set train.epochs=2 --set train.min_steps=0 --set train.num_workers=1 "
                   f"--set backend.gmm.max_iter=5 --out {out}",
        runtime_env={"working_dir": str(ROOT)})
    deadline = time.time() + 400
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                         JobStatus.STOPPED):
        assert time.time() < deadline, "job did not finish in 400 s"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "joint (labeled + pseudo)" in logs  # the summary table reached the job's log
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["dataset"] == "digits" and "test_accuracy" in m["joint"]
    assert list((out / "pseudo_labels.parquet").glob("part-*.parquet"))
    assert (out / "model.pt").is_file()


def _wait_for_port(port: int, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.time() < deadline, f"nothing listens on port {port} after {seconds} s"
            time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_dead_runs_cpus_are_freed_beside_another_ray(split, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """With another Ray on this machine (here a `ray start` head; two `raysl run` at once do
    the same), Ray Train's PlacementGroupCleaner still finds this session's Ray: no "Found
    multiple active Ray instances" in the output, and when a run's controller dies while the
    job goes on (its driver task killed, as Tune stops a trial), the run's placement group,
    its CPUs, is released (without the cleaner it stays until the whole job ends)."""
    import ray
    from ray.util.placement_group import PlacementGroup

    from raysl.distributed.trainer import train_classifier

    e = np.zeros((0, *split.input_shape), np.float32)
    data = TrainData(split.x_l, split.y_l, e, np.zeros(0, np.int64), np.zeros(0, np.float32),
                     split.x_val, split.y_val, len(split.x_u))
    cfg = TrainConfig(epochs=5000, num_workers=1, cpus_per_worker=0.5, min_steps=0)
    before = set(ray.util.placement_group_table())

    def ours() -> dict[str, str]:
        return {k: v["state"] for k, v in ray.util.placement_group_table().items()
                if k not in before}

    with _ray_head(num_cpus=1) as head:
        _wait_for_port(head.gcs_port, 60)
        run = ray.remote(num_cpus=0, max_retries=0)(train_classifier).remote(
            data, cfg, split.input_shape, split.n_classes, tmp_path, "beside", verbose=False)
        try:
            deadline = time.time() + 180
            while not list((tmp_path / "beside").glob("checkpoint_*")):  # it trains
                assert time.time() < deadline, "no checkpoint within 180 s"
                time.sleep(0.2)
            ray.cancel(run, force=True)  # the driver dies; the controller with it
            deadline = time.time() + 30
            while any(s != "REMOVED" for s in ours().values()) and time.time() < deadline:
                time.sleep(0.5)
            left = ours()
        finally:
            with contextlib.suppress(Exception):
                ray.cancel(run, force=True)
            from ray._raylet import PlacementGroupID

            for pg in [k for k, s in ours().items() if s != "REMOVED"]:  # for later tests
                ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg)))
        time.sleep(2)  # the cleaner's log lines reach the driver asynchronously
    text = "".join(capfd.readouterr())
    assert left and set(left.values()) == {"REMOVED"}, (left, text[-3000:])
    assert "Found multiple active Ray instances" not in text, text[-3000:]
    assert "with cleaner" not in text, text[-3000:]  # "Failed to register ... with cleaner"


@pytest.mark.ray
def test_two_nodes_share_actors_and_train_workers(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_run.py"),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # the metrics' JSON line; the ranks' forwarded log lines may arrive after it
    m = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert m["cluster_nodes"] == 2
    assert m["data"]["pool"] == "object store"  # Parquet files: the driver fetched no row
    assert m["pseudo_labels"]["nodes"] == 2  # one shard actor on each node
    assert m["baseline"]["nodes"] == m["joint"]["nodes"] == 2  # one DDP rank on each node
    # each rank read its own share of the kept rows and of the pool through Ray Data
    kept, pool = m["pseudo_labels"]["n_selected"], m["data"]["n_unlabeled"]
    assert not m["guard"]["tripped"] and 0 < kept < pool, m["guard"]
    shares = m["joint"]["rank_rows"]
    assert [s["x_p"] for s in shares] == [(kept + 1) // 2, kept // 2], (shares, kept)
    assert [s["x_u"] for s in shares] == [(pool + 1) // 2, pool // 2], (shares, pool)
    assert all(s["on_disk"] == ["x_p", "x_u"] for s in shares), shares  # share_storage=disk
    # the pool's labels stayed in the object store; each rank read its kept rows' with them,
    # and its pool rows' true labels (FixMatch measures its online labels with them)
    assert m["pseudo_labels"]["labels"] == "object store"
    assert all(s["with_rows"] == ["w_p", "y_p", "y_u"] for s in shares), shares
    assert all(set(s["read_seconds"]) == {"x_p", "x_u"} and min(s["read_seconds"].values()) > 0
               for s in shares), shares  # how long each read took, for bench scale
    actors = m["pseudo_labels"]["actors"]  # shard_storage=disk: each actor's shard on disk
    assert [a["on_disk"] for a in actors] == [True, True], actors
    assert sum(a["rows"] for a in actors) == pool, (actors, pool)
    assert (tmp_path / "out" / "metrics.json").is_file()
