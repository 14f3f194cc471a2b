"""Integration tests on a real local Ray (one session for the module, 2 CPUs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from faults import Fault, failing_loop

from raysl import pipeline
from raysl.backends import BACKENDS, FitContext
from raysl.backends.base import LocalExecutor, Shard, ShardWorker, fit
from raysl.config import Config, DataConfig, TrainConfig, apply_overrides, load_config
from raysl.data import load_dataset, make_split, shard
from raysl.train import TrainData

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def split():
    cfg = DataConfig()
    return make_split(load_dataset(cfg), cfg)


def _shards(split, n: int) -> list[Shard]:
    return [Shard(x, split.x_l, split.y_l, i) for i, x in enumerate(shard(split.x_u, n))]


def _fit_both(name: str, split, ctx: FitContext, cfg: Config, n_shards: int):
    from raysl.distributed.actors import RayExecutor

    factory = BACKENDS[name]
    shards = _shards(split, n_shards)
    local = fit(factory(cfg.backend, ctx),
                LocalExecutor([ShardWorker(factory, cfg.backend, ctx, s) for s in shards]),
                split.x_l, split.y_l)
    with RayExecutor(factory, cfg.backend, ctx, shards, num_cpus=0.5) as ex:
        remote = fit(factory(cfg.backend, ctx), ex, split.x_l, split.y_l)
    return local, remote


def test_gmm_actor_fit_equals_local_fit(split) -> None:
    cfg = apply_overrides(Config(), {"backend.gmm.max_iter": 15})
    ctx = FitContext(split.n_classes, split.input_shape, seed=0)
    local, remote = _fit_both("gmm", split, ctx, cfg, n_shards=3)
    assert local.rounds == remote.rounds > 1
    # identical up to rounding (BLAS thread counts differ between driver and actors)
    np.testing.assert_allclose(local.proba, remote.proba, rtol=0, atol=1e-9)
    np.testing.assert_allclose(local.objective, remote.objective, rtol=1e-12)
    assert remote.proba.shape == (len(split.x_u), split.n_classes)


def test_self_backend_actor_fit_equals_local_fit(split) -> None:
    from raysl.models import build_model
    from raysl.train import state_to_numpy

    torch.manual_seed(0)
    state = state_to_numpy(build_model(split.input_shape, split.n_classes).state_dict())
    ctx = FitContext(split.n_classes, split.input_shape, 0, classifier_state=state)
    local, remote = _fit_both("self", split, ctx, Config(), n_shards=2)
    assert remote.rounds == 0
    np.testing.assert_allclose(local.proba, remote.proba, rtol=0, atol=1e-6)


def test_gmm_in_the_embedding_actor_fit_equals_local_fit(split) -> None:
    """Each actor embeds its own shard (one torch thread, fixed batch shape): the same
    features, so the same EM, as the driver's in-process loop."""
    from raysl.models import build_model
    from raysl.train import state_to_numpy

    torch.manual_seed(0)
    state = state_to_numpy(build_model(split.input_shape, split.n_classes, 32).state_dict())
    ctx = FitContext(split.n_classes, split.input_shape, 0, hidden=32, classifier_state=state)
    cfg = apply_overrides(Config(), {"backend.gmm.max_iter": 15,
                                     "backend.gmm.features": "embedding"})
    local, remote = _fit_both("gmm", split, ctx, cfg, n_shards=2)
    assert local.rounds == remote.rounds > 1
    assert local.state["mean"].shape == (32,)  # the PCA ran on the 32-wide embedding
    np.testing.assert_allclose(local.proba, remote.proba, rtol=0, atol=1e-9)
    np.testing.assert_allclose(local.objective, remote.objective, rtol=1e-12)


def test_vae_actor_fit_equals_local_fit(split) -> None:
    """FedAvg rounds through Ray actors (state via the object store) == the in-process loop."""
    cfg = apply_overrides(Config(), {
        "backend.vae.rounds": 2, "backend.vae.local_epochs": 1, "backend.vae.hidden": 32,
        "backend.vae.latent_dim": 4, "backend.vae.m1_dim": 8, "backend.vae.features": "inputs"})
    ctx = FitContext(split.n_classes, split.input_shape, seed=0)
    local, remote = _fit_both("vae", split, ctx, cfg, n_shards=2)
    assert local.rounds == remote.rounds == 2
    # equal up to float32 rounding (the actor process's torch may pick other CPU kernels)
    for k, v in local.state["arrays"].items():
        np.testing.assert_allclose(remote.state["arrays"][k], v, rtol=1e-4, atol=1e-6,
                                   err_msg=k)
    np.testing.assert_allclose(local.proba, remote.proba, rtol=0, atol=1e-5)
    assert remote.proba.shape == (len(split.x_u), split.n_classes)


def _train_data(split) -> TrainData:
    e = np.zeros((0, *split.input_shape), np.float32)
    return TrainData(split.x_l, split.y_l, e, np.zeros(0, np.int64), np.zeros(0, np.float32),
                     split.x_val, split.y_val, len(split.x_u))


def test_training_resumes_from_checkpoint_after_a_crash(split, tmp_path: Path) -> None:
    """A run that dies at epoch 3 is resumed from its last checkpoint by running it again, and
    ends with exactly the weights of a run that never failed (epochs are safe to redo)."""
    from raysl.distributed.trainer import train_classifier

    cfg = TrainConfig(epochs=4, num_workers=1, cpus_per_worker=0.5, min_steps=0)
    args = (_train_data(split), cfg, split.input_shape, split.n_classes, tmp_path)
    fault = Fault(str(tmp_path / "fired"), at=3, exit=False)
    with pytest.raises(Exception, match="injected fault"):
        train_classifier(*args, "crashy", max_failures=0, loop=failing_loop(fault),
                         verbose=False)
    resumed = train_classifier(*args, "crashy", verbose=False)
    fresh = train_classifier(*args, "fresh", verbose=False)
    assert resumed.resumed_from_epoch in (1, 2)  # the newest checkpoint may lag by one
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for k in fresh.state:
        np.testing.assert_array_equal(resumed.state[k], fresh.state[k], err_msg=k)


def test_run_end_to_end_writes_sane_outputs_and_resumes(tiny_config: Config,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    m = pipeline.run(tiny_config, out)

    for f in ("config.yaml", "metrics.json", "model.pt", "baseline/model.pt",
              "joint/model.pt"):
        assert (out / f).is_file(), f
    assert (len(list((out / "pseudo_labels.parquet").glob("part-*.parquet")))
            == tiny_config.data.n_shards)
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    # config.yaml replays to the same config
    assert load_config(out / "config.yaml") == tiny_config
    # metrics.json is strict JSON with the required figures
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("baseline", "joint"):
        assert 0.0 <= saved[key]["test_accuracy"] <= 1.0
    p = saved["pseudo_labels"]
    assert 0.0 <= p["coverage"] <= 1.0 and 0.0 <= p["precision"] <= 1.0
    assert sum(p["per_class"]) == p["n_selected"]
    # pseudo_labels.parquet: one row per unlabeled row, selection consistent with metrics
    t = pq.read_table(out / "pseudo_labels.parquet").to_pydict()
    assert len(t["row"]) == m["data"]["n_unlabeled"] == len(set(t["row"]))
    assert sum(t["selected"]) == p["n_selected"]
    assert all(c > tiny_config.select.threshold for c, s in zip(t["confidence"], t["selected"],
                                                                strict=True) if s)
    assert set(t["backend"]) == {"gmm"}
    # the final model loads without pickled code and reproduces the reported test accuracy
    model = pipeline.load_model(out / "model.pt")
    split = pipeline.check(tiny_config)
    with torch.no_grad():
        acc = (model(torch.from_numpy(split.x_test)).argmax(1).numpy() == split.y_test).mean()
    # (the final model is the joint one or the baseline, whichever won on validation)
    assert m["final"]["model"] in ("joint", "baseline")
    assert acc == pytest.approx(m["final"]["test_accuracy"])
    assert m["final"]["test_accuracy"] == m[m["final"]["model"]]["test_accuracy"]

    # Running again resumes: every stage is found done, and the figures are the same.
    again = pipeline.run(tiny_config, out)
    assert again["baseline"]["cached"] and again["joint"]["cached"]
    assert again["pseudo_labels"]["cached"]
    assert again["joint"]["test_accuracy"] == m["joint"]["test_accuracy"]

    # A new threshold re-uses the cached probabilities (no refit) and retrains the joint model.
    cfg2 = dataclasses.replace(tiny_config, select=dataclasses.replace(tiny_config.select,
                                                                      threshold=0.999))
    m2 = pipeline.run(cfg2, out)
    assert m2["pseudo_labels"]["cached"] and m2["baseline"]["cached"]
    assert not m2["joint"]["cached"]
    assert m2["pseudo_labels"]["n_selected"] <= p["n_selected"]
    assert yaml.safe_load((out / "config.yaml").read_text())["select"]["threshold"] == 0.999


def test_relabel_rounds_retrain_from_the_last_joint_model(tiny_config: Config,
                                                          tmp_path: Path) -> None:
    """backend.relabel_rounds=2: the first joint model re-labels the pool (as `self`) and a
    second joint model is trained; it is the final model unless the baseline scores higher
    on validation, and rerunning finds it cached."""
    # the rounds' logic, not DDP (tested elsewhere): Ray Train's local mode, 3 s a start-up
    cfg = apply_overrides(tiny_config, {"backend.relabel_rounds": 2, "backend.name": "gmm",
                                        "train.num_workers": 0})
    out = tmp_path / "run"
    m = pipeline.run(cfg, out)
    assert [r["round"] for r in m["relabel"]] == [2]
    r2 = m["relabel"][0]
    assert r2["pseudo_labels"]["backend"] == "self"
    assert (out / "joint" / "model.pt").is_file() and (out / "joint-2" / "model.pt").is_file()
    assert m["final"]["model"] in ("joint-2", "baseline")
    chosen = out / m["final"]["model"] / "model.pt"
    assert (out / "model.pt").read_bytes() == chosen.read_bytes()
    assert m["joint"]["test_accuracy"] == r2["test_accuracy"]
    # the re-labelled pool is the first joint model's predictions, not the gmm's
    gmm_cache = list((out / "cache").glob("labels-gmm-*"))
    self_cache = list((out / "cache").glob("labels-self-*"))
    assert len(gmm_cache) == 1 and len(self_cache) == 1
    model = pipeline.load_model(out / "joint" / "model.pt")
    split = pipeline.check(cfg)
    with torch.no_grad():
        pred = torch.softmax(model(torch.from_numpy(split.x_u)), 1).numpy()
    parts = sorted(self_cache[0].glob("part-*.npz"))  # one per shard, in pool order
    assert len(parts) == cfg.data.n_shards
    labels = np.concatenate([np.load(p)["label"] for p in parts])
    np.testing.assert_array_equal(labels, pred.argmax(1))  # argmax labels
    again = pipeline.run(cfg, out)
    assert again["relabel"][0]["cached"] and again["joint"]["test_accuracy"] == r2["test_accuracy"]


def test_bench_accuracy_on_ray_tasks_equals_the_in_process_run(tmp_path: Path) -> None:
    """--workers 2 runs units as Ray generator tasks; the rows must match a plain run."""
    from raysl.bench.accuracy import main

    argv = ["--datasets", "digits", "--labels", "1", "--seeds", "2", "--threads", "1",
            "--methods", "label_spreading,supervised,backends", "--backends", "gmm",
            "--set", "train.epochs=1", "--set", "train.hidden=16",
            "--set", "backend.gmm.max_iter=3"]
    assert main([*argv, "--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    assert main([*argv, "--out", str(tmp_path / "plain"), "--workers", "1"]) == 0

    def rows(d: str) -> dict[tuple[int, str], float]:
        lines = (tmp_path / d / "runs.jsonl").read_text().splitlines()
        return {(r["seed"], r["method"]): r["test_accuracy"] for r in map(json.loads, lines)}

    on_ray = rows("ray")
    assert len(on_ray) == 6 and on_ray == rows("plain")


def test_shard_actors_reserve_no_gpu_when_training_uses_one(split) -> None:
    """train.use_gpu is the classifier's: no backend uses a GPU, so shard actors must not ask
    for one (they used to reserve a whole GPU each and waited forever on a machine without)."""
    import threading

    cfg = apply_overrides(Config(), {"train.use_gpu": True, "backend.name": "gmm",
                                     "backend.gmm.max_iter": 3, "data.n_shards": 2})
    ctx = FitContext(split.n_classes, split.input_shape, seed=0)
    done = threading.Event()

    def fit_on_actors() -> None:
        pipeline.fit_backend(split, cfg, ctx, use_ray=True)
        done.set()

    threading.Thread(target=fit_on_actors, daemon=True).start()
    assert done.wait(120), "the shard actors are waiting for a GPU"


def test_pool_labels_stay_in_the_object_store_and_select_as_in_this_process(
        split, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On Ray actors the pool's labels and confidences stay in the object store (the driver
    holds one reference per shard and part) and every selection over them, planned and
    measured by tasks, keeps the rows and gives the figures the same selection in this
    process does (a threshold, and per_class on the aligned labels: the radix select, whose
    every criterion tests/test_select.py checks against a global sort); the cache read back
    on Ray stays
    remote too, and `pseudo_labels.parquet`'s parts (written by tasks) hold the selection.
    A truncated cache part, read by a task, is caught there (the task's error wraps the
    reader's), reported, removed and refitted."""
    n_shards = 2
    import ray

    from raysl.columns import PoolSelection
    from raysl.select import select_labels

    cfg = apply_overrides(Config(), {"backend.name": "gmm", "backend.gmm.max_iter": 5,
                                     "data.n_shards": n_shards})
    remote = pipeline.pseudo_label(split, cfg, tmp_path / "ray", {}, use_ray=True)
    local = pipeline.pseudo_label(split, cfg, tmp_path / "local", {}, use_ray=False)
    assert all(isinstance(o, ray.ObjectRef) for p in remote["pool"].parts for o in p)
    assert not local["pool"].remote
    cached = pipeline.pseudo_label(split, cfg, tmp_path / "ray", {}, use_ray=True)
    assert cached["cached"] and cached["pool"].remote
    for crit, aligned in [("threshold", False), ("per_class", True)]:
        c = apply_overrides(cfg, {"select.criterion": crit, "select.k_best": 150,
                                  "select.threshold": 0.9, "select.align": aligned})
        sels = [pipeline.selection(split, c, pl) for pl in (remote, local, cached)]
        (rs, rm), (ls, lm), (cs, cm) = sels
        for m in (rm, cm):  # (the actors' BLAS may round the last bits differently)
            assert {k: m[k] for k in ("n_selected", "per_class", "coverage")} == {
                k: lm[k] for k in ("n_selected", "per_class", "coverage")}
            assert m["precision"] == pytest.approx(lm["precision"], nan_ok=True)
            assert m["ece"] == pytest.approx(lm["ece"], abs=1e-6)
        for a, b in zip(rs.kept(), ls.kept(), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert 0 < rm["n_selected"] < len(split.x_u)
        # the same rows as selecting from the gathered labels in one place
        g = ls.gather()
        want = select_labels(g.labels, g.conf, split.n_classes, crit, 0.9, 150,
                             pipeline.class_prior(split.y_l, split.n_classes),
                             c.select.per_class_share)
        np.testing.assert_array_equal(rs.gather().mask, want.mask)
        assert isinstance(rs, PoolSelection) and rs.digest() == cs.digest()
    pipeline.write_pseudo_labels(tmp_path / "pl.parquet", rs, "gmm")
    assert len(list((tmp_path / "pl.parquet").glob("part-*.parquet"))) == n_shards
    t = pq.read_table(tmp_path / "pl.parquet").to_pydict()
    np.testing.assert_array_equal(t["row"], split.idx_u)
    np.testing.assert_array_equal(t["selected"], rs.gather().mask)
    pipeline.write_pseudo_labels(tmp_path / "pl.parquet", rs.nothing(), "gmm")  # replaces it
    assert not any(pq.read_table(tmp_path / "pl.parquet").to_pydict()["selected"])
    assert not list(tmp_path.glob(".pl.parquet*")), "temporary folders left behind"
    (part,) = tmp_path.glob("ray/cache/labels-gmm-*/part-00001.npz")
    part.write_bytes(part.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="raysl"):
        again = pipeline.pseudo_label(split, cfg, tmp_path / "ray", {}, use_ray=True)
    assert not again["cached"] and "corrupt or incomplete" in caplog.text
    np.testing.assert_array_equal(again["pool"].gather("label")[0],
                                  remote["pool"].gather("label")[0])


def test_a_rank_reads_the_kept_rows_with_their_labels_from_where_they_are() -> None:
    """The joint job's kept rows, when the pool and its labels are both in the object store:
    each rank's dataset holds its share of the kept rows (every world-th, as
    raysl.data.rank_share) with their labels and confidences, read from the shards' parts by
    the rule (the driver holds no per-row array); and every row's labels ride with the pool
    (train.offline=prior). The same as masking the gathered arrays, for 1, 2 and 3 ranks."""
    import ray

    from raysl.columns import PoolSelection, split_columns
    from raysl.data import rank_share, shard_bounds
    from raysl.distributed.pool import RemoteRows, share_from_batches

    rng = np.random.default_rng(3)
    n, n_classes = 301, 4
    x = rng.random((n, 2, 3)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    conf = rng.random(n).astype(np.float32)
    bounds = shard_bounds(n, 3)
    # two stored parts per shard, their keys interleaved (as blocks routed to a shard are)
    parts = tuple(tuple(ray.put({"key": np.arange(a, b)[j::2], "x": x[a:b][j::2]})
                        for j in range(2)) for a, b in bounds)
    rows = RemoteRows(parts, tuple(bounds), (2, 3))
    pool = split_columns(np.arange(n), np.full(n, -1), bounds, put=ray.put).join(
        [ray.put({"label": labels[a:b], "conf": conf[a:b]}) for a, b in bounds])
    sel = PoolSelection.plan(pool, n_classes, "per_class", 0.6, 100, None, 0.3, False)
    kept, y_p, w_p = sel.kept()
    assert 0 < len(kept) < n
    x_p = rows.with_columns(sel.row_columns({"y_p": "label", "w_p": "conf"}))
    x_u = rows.with_columns(pool.row_columns({"prior_label": "label"}))
    assert len(x_p) == len(kept) and len(x_u) == n
    np.testing.assert_array_equal(x_p.fetch(), x[kept])
    for world in (1, 2, 3):
        for rank, (dp, du) in enumerate(zip(x_p.rank_datasets(world), x_u.rank_datasets(world),
                                            strict=True)):
            share = rank_share(len(kept), rank, world)
            got = share_from_batches(dp.iter_batches(batch_size=None, batch_format="numpy"),
                                     len(share), (2, 3))
            np.testing.assert_array_equal(got["x"], x[kept[share]])
            np.testing.assert_array_equal(got["y_p"], y_p[share])
            np.testing.assert_array_equal(got["w_p"], w_p[share])
            share = rank_share(n, rank, world)
            got = share_from_batches(du.iter_batches(batch_size=None, batch_format="numpy"),
                                     len(share), (2, 3))
            np.testing.assert_array_equal(got["x"], x[share])
            np.testing.assert_array_equal(got["prior_label"], labels[share])

