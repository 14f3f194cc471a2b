"""Classifier training as a Ray Train v2 ``TorchTrainer`` (DDP: gloo on CPU, nccl on GPU).

The worker runs raysl's one training loop (:func:`raysl.train.train_loop`): it prepares the
model for DDP, resumes from ``ray.train.get_checkpoint()`` if there is one, and reports metrics
every epoch and a checkpoint every ``train.checkpoint_every`` epochs and after the last (rank 0
attaches it; every rank calls ``report``, which is a barrier). Re-running with the same storage
path and name resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raysl.config import TrainConfig
from raysl.distributed.pool import RemoteRows, share_from_batches
from raysl.memory import keep_on_disk, process_memory
from raysl.train import (
    RankRows,
    Snapshot,
    TrainData,
    TrainOutcome,
    init_model,
    state_to_numpy,
    train_loop,
)

CKPT_FILE = "state.pt"


log = logging.getLogger("raysl")


def _quiet_report_logs() -> None:
    """In a Ray Train worker process (never the driver: local mode runs the loop there).

    Ray 2.60 logs every ``ray.train.report`` at INFO (one line per epoch and rank, which drowns
    progress) through a logger named by its source file's path, not under ``ray.train``: so
    ``RunConfig(logging_config=LoggingConfig(log_level="WARNING"))``, which filters only
    ``ray.train*`` records, does not reach it, and Train sets this process's root logger to
    INFO. The root logger back at WARNING (Python's default) silences it; raysl's own progress
    goes through the "raysl" logger, which has its level and handler (:func:`_worker_logging`).
    """
    logging.getLogger().setLevel(logging.WARNING)
    # Ray Data logs each dataset execution (a rank's share of the rows) at INFO, and warns
    # once that its progress bars are off (raysl turns them off: _no_data_progress_bars); a
    # failed read still raises in the rank. ray.data is imported (this module imports it), so
    # its logging config, applied on import, does not reset this level.
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _worker_logging(verbose: bool) -> None:
    """Progress to this worker's stdout, which Ray forwards to the driver's console (the CLI
    installs the same handler in the driver, for local mode). Once per process."""
    if not verbose or any(h.get_name() == "raysl-worker" for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.set_name("raysl-worker")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # not through Ray Train's root handlers as well (twice)


def _worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function (``train_loop_per_worker``) for :func:`train_classifier`:
    :func:`raysl.train.train_loop` on a DDP-prepared model, resumed from Ray Train's latest
    checkpoint, reporting every epoch (a barrier: every rank reports; rank 0 attaches the
    checkpoint every ``train.checkpoint_every`` epochs and after the last)."""
    cfg = TrainConfig(**config["train"])
    if cfg.num_workers > 0:  # a Ray Train worker process of its own
        _quiet_report_logs()
        _worker_logging(config["verbose"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data: TrainData = ray.get(config["data"])

    on_disk: list[str] = []
    read_seconds: dict[str, float] = {}

    def read(field: str, share: np.ndarray) -> dict[str, np.ndarray]:
        # this rank's rows of a field left in the object store: its own dataset (see
        # _rank_datasets), read here through Ray Train; the other ranks' rows never come here
        # (nor their labels: a selection's kept rows come with theirs, TrainData.for_rank)
        start = time.perf_counter()
        row_shape = getattr(data, field).row_shape
        disk = keep_on_disk(cfg.share_storage, (len(share), *row_shape))
        if disk:
            on_disk.append(field)
        shard = ray.train.get_dataset_shard(f"{field}-{rank}")
        columns = getattr(data, field).columns
        got = share_from_batches(shard.iter_batches(batch_size=None, batch_format="numpy"),
                                 len(share), row_shape, on_disk=disk,
                                 columns=list(columns.names) if columns else [])
        read_seconds[field] = round(time.perf_counter() - start, 3)
        return got  # the rows as "x", and any columns read with them (TrainData.for_rank)

    data = data.for_rank(rank, world, read)
    device = ray.train.torch.get_device()
    # the same initial weights on every rank (DDP broadcasts anyway)
    model = init_model(cfg, tuple(config["input_shape"]), config["n_classes"])
    model = ray.train.torch.prepare_model(model)
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(Path(d) / CKPT_FILE, map_location=device, weights_only=True)

    def report(epoch: int, row: dict[str, Any], snapshot: Snapshot) -> None:
        keep = (epoch + 1) % cfg.checkpoint_every == 0 or epoch == cfg.epochs - 1
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and keep:
                torch.save(snapshot(), Path(tmp) / CKPT_FILE)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(row, checkpoint=checkpoint)

    kept, history, _ = train_loop(model, data, cfg, rank=rank, world_size=world, device=device,
                                  resume=resume, on_epoch=report, name=config["name"],
                                  verbose=config["verbose"])
    # where every rank ran, what it read, where it kept it and its memory at the end of the
    # loop (its rows still held), for the record (the multi-node test, `raysl bench scale`)
    read_rows: dict[str, Any] = {
        f: len(x.rows) for f in ("x_p", "x_u") if isinstance(x := getattr(data, f), RankRows)}
    # the per-row fields that came with the rows (a selection's labels: not from the driver)
    with_rows = sorted(f for f in ("y_p", "w_p", "y_u", "prior_label", "prior_conf")
                       if isinstance(getattr(data, f), RankRows))
    mine = (ray.get_runtime_context().get_node_id(),
            {**read_rows, "with_rows": with_rows, "on_disk": on_disk,
             "read_seconds": read_seconds,
             "memory": process_memory()})
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
    if rank != 0:
        return None
    return {"model": state_to_numpy(kept.state_dict()), "history": history,
            "nodes": [n for n, _ in ranks], "rank_rows": [r for _, r in ranks]}


def train_classifier(data: TrainData, cfg: TrainConfig, input_shape: tuple[int, ...],
                     n_classes: int, storage_path: str | Path, name: str,
                     verbose: bool = True, max_failures: int = 1,
                     callbacks: list[Any] | None = None,
                     loop: Callable[[dict[str, Any]], Any] = _worker_loop) -> TrainOutcome:
    """Train the classifier with Ray Train; resume if ``storage_path/name`` has checkpoints.

    ``cfg.num_workers == 0`` runs the same loop in this process (Ray Train's local mode, which
    keeps no checkpoints). ``storage_path`` may be a local/shared directory or a cloud URI
    (pyarrow filesystems). ``loop`` is the per-worker function Ray Train runs with the config
    dict (default :func:`_worker_loop`; a wrapper around it must return what it returns)."""
    t0 = time.perf_counter()
    # Local mode keeps no checkpoint on disk, so the final weights come back as rank 0's
    # return value; the per-epoch checkpoints are there for resuming.
    with _no_data_progress_bars():
        out = _fit_interruptibly(_trainer(data, cfg, input_shape, n_classes, storage_path, name,
                                          verbose, max_failures, callbacks, loop)).return_value
    history = out["history"]
    resumed = max((int(h["resumed_from_epoch"]) for h in history), default=-1)
    return TrainOutcome(out["model"], history, time.perf_counter() - t0, resumed, out["nodes"],
                        out["rank_rows"])


def _trainer(data: TrainData, cfg: TrainConfig, input_shape: tuple[int, ...], n_classes: int,
             storage_path: str | Path, name: str, verbose: bool, max_failures: int,
             callbacks: list[Any] | None, loop: Callable[[dict[str, Any]], Any]
             ) -> TorchTrainer:
    datasets = _rank_datasets(data, max(cfg.num_workers, 1))
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        loop,
        train_loop_config={"train": asdict(cfg), "data": ray.put(data), "name": name,
                           "input_shape": list(input_shape), "n_classes": n_classes,
                           "verbose": verbose},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        # one dataset per rank, passed whole (not split again): rank r reads "<field>-r"
        datasets=datasets or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        run_config=RunConfig(
            name=name, storage_path=_storage(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,  # e.g. Tune's TuneReportCallback inside a Tune trial
        ),
    )


def _rank_datasets(data: TrainData, world: int) -> dict[str, ray.data.Dataset]:
    """For each row field of ``data`` left in the object store (``x_p``, ``x_u``:
    :class:`~raysl.distributed.pool.RemoteRows`), one Ray Dataset per rank of ``world`` named
    ``"<field>-<rank>"``: the rows of that rank's share (:func:`raysl.data.rank_share`),
    read from the parts where they live by Ray Data tasks. The driver never holds them, and
    no rank holds another rank's rows."""
    out: dict[str, ray.data.Dataset] = {}
    for field in ("x_p", "x_u"):
        x = getattr(data, field)
        if isinstance(x, RemoteRows):
            for r, ds in enumerate(x.rank_datasets(world)):
                out[f"{field}-{r}"] = ds
    return out


@contextlib.contextmanager
def _no_data_progress_bars() -> Iterator[None]:
    """Ray Data's progress bars off for the ranks' reads (the trainer hands its workers a copy
    of this process's DataContext, taken when it is built or fitted): raysl reports the
    training's own progress. Restored after."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


def _fit_interruptibly(trainer: TorchTrainer) -> Any:
    """``trainer.fit()``, with Ctrl-C as Python has it. In the main thread Ray Train replaces
    the process's SIGINT handler with its own, which aborts the run and raises SystemExit (and
    stays installed after the fit): here the abort becomes a KeyboardInterrupt, and the
    previous handler is put back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit as e:  # only Ray Train's SIGINT handler exits from inside fit()
        raise KeyboardInterrupt("training aborted by SIGINT") from e
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _storage(path: str | Path) -> str:
    """Absolute local paths (a job's working directory is a temporary upload); URIs as is."""
    s = str(path)
    return s if "://" in s else str(Path(s).resolve())
