"""Classifier training as a Ray Train v2 ``TorchTrainer`` (DDP: gloo on CPU, nccl on GPU).

The worker loop is a thin shell around :func:`raysl.train.run_epoch`: prepare the model for
DDP, resume from ``ray.train.get_checkpoint()`` if there is one, report metrics every epoch and
a checkpoint every ``train.checkpoint_every`` epochs and after the last (rank 0 attaches it;
every rank calls ``report``, which is a barrier). Re-running with the same storage path and
name resumes from the latest checkpoint.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raysl.config import TrainConfig
from raysl.distributed.faults import Fault
from raysl.models import build_model
from raysl.train import (
    TrainData,
    accuracy,
    make_optimizer,
    run_epoch,
    state_to_numpy,
    unwrap,
)

CKPT_FILE = "state.pt"


@dataclass
class TrainOutcome:
    state: dict[str, Any]  # the final model's state dict (EMA teacher if on), numpy arrays
    history: list[dict[str, float]]  # one row per epoch
    seconds: float
    resumed_from_epoch: int  # -1 when the run started fresh
    nodes: list[str]  # the Ray node of each rank


def _quiet_report_logs() -> None:
    # Ray 2.60 logs every report at INFO through a logger named by its file path, which
    # LoggingConfig(log_level=...) does not reach; one line per epoch and rank drowns progress.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    _quiet_report_logs()
    cfg = TrainConfig(**config["train"])
    data: TrainData = ray.get(config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts anyway)
    model = build_model(tuple(config["input_shape"]), config["n_classes"], cfg.hidden,
                        cfg.init)
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(model, cfg)
    # The EMA teacher: per rank, but identical on every rank (DDP keeps the students in sync),
    # so rank 0's is the model. It evaluates, labels the weak views and is the result.
    teacher = copy.deepcopy(unwrap(model)) if cfg.ema > 0 else None
    ssl_state: dict[str, torch.Tensor] = {}  # adaptive thresholds, distribution alignment

    start, history, resumed = 0, [], -1
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = torch.load(Path(d) / CKPT_FILE, map_location=device, weights_only=True)
        unwrap(model).load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if teacher is not None:
            teacher.load_state_dict(saved["teacher"])
        ssl_state.update(saved.get("ssl_state", {}))
        start, history, resumed = saved["epoch"] + 1, saved["history"], saved["epoch"]

    fault: Fault | None = config.get("fault")

    def evaluated() -> torch.nn.Module:
        """The model that is evaluated and returned: the EMA teacher when there is one."""
        return teacher if teacher is not None else unwrap(model)

    def mid_epoch_fault(step: int, steps: int) -> None:
        if fault is not None and step == steps // 2:
            fault.fire(epoch, rank)

    for epoch in range(start, cfg.epochs):
        t0, started_at = time.perf_counter(), time.time()
        row = run_epoch(model, opt, data, cfg, epoch, rank, world, device, mid_epoch_fault,
                        teacher=teacher, ssl_state=ssl_state)
        train_s = time.perf_counter() - t0
        row.update(epoch=epoch, val_accuracy=accuracy(evaluated(), data.x_val, data.y_val,
                                                      device),
                   epoch_seconds=time.perf_counter() - t0, train_seconds=train_s,
                   resumed_from_epoch=resumed,
                   started_at=started_at)  # wall clock: epoch-to-epoch time incl. reporting
        history.append(row)
        if rank == 0 and config["verbose"]:
            print(f"[{config['name']}] epoch {epoch + 1}/{cfg.epochs} loss={row['loss']:.3f} "
                  f"val_acc={row['val_accuracy']:.3f} ({row['epoch_seconds']:.1f}s)", flush=True)
        keep = (epoch + 1) % cfg.checkpoint_every == 0 or epoch == cfg.epochs - 1
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and keep:
                saved = {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                         "epoch": epoch, "history": history, "ssl_state": ssl_state}
                if teacher is not None:
                    saved["teacher"] = teacher.state_dict()
                torch.save(saved, Path(tmp) / CKPT_FILE)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(row, checkpoint=checkpoint)
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:  # where every rank ran, for the record (and the multi-node test)
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, nodes[0])
        nodes = gathered
    if rank != 0:
        return None
    return {"model": state_to_numpy(evaluated().state_dict()), "history": history,
            "nodes": nodes}


def train_classifier(data: TrainData, cfg: TrainConfig, input_shape: tuple[int, ...],
                     n_classes: int, storage_path: str | Path, name: str,
                     verbose: bool = True, max_failures: int = 1,
                     fault: Fault | None = None,
                     callbacks: list[Any] | None = None) -> TrainOutcome:
    """Train the classifier with Ray Train; resume if ``storage_path/name`` has checkpoints.

    ``cfg.num_workers == 0`` runs the same loop in this process (Ray Train's local mode, which
    keeps no checkpoints). ``fault`` makes a worker fail mid-epoch once (fault tests).
    ``storage_path`` may be a local/shared directory or a cloud URI (pyarrow filesystems)."""
    t0 = time.perf_counter()
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train": asdict(cfg), "data": ray.put(data), "name": name,
                           "input_shape": list(input_shape), "n_classes": n_classes,
                           "verbose": verbose, "fault": fault},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=_storage(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,  # e.g. Tune's TuneReportCallback inside a Tune trial
        ),
    )
    # Local mode keeps no checkpoint on disk, so the final weights come back as rank 0's
    # return value; the per-epoch checkpoints are there for resuming.
    out = trainer.fit().return_value
    history = out["history"]
    resumed = max((int(h["resumed_from_epoch"]) for h in history), default=-1)
    return TrainOutcome(out["model"], history, time.perf_counter() - t0, resumed, out["nodes"])


def _storage(path: str | Path) -> str:
    """Absolute local paths (a job's working directory is a temporary upload); URIs as is."""
    s = str(path)
    return s if "://" in s else str(Path(s).resolve())
