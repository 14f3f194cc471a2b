"""``raysl bench ray-overhead``: a training epoch through Ray Train (1 worker) vs the same loop
in plain PyTorch (same model, data, batch, config and thread count), as a throughput ratio.

Both sides run :func:`raysl.train.train_loop` (epochs and the validation pass); the Ray side is
``train_classifier`` (TorchTrainer, 1 worker holding ``--threads`` CPUs, so Ray gives it as many
OpenMP threads), which also calls ``ray.train.report`` every epoch and attaches a checkpoint
every ``train.checkpoint_every`` epochs (one Ray run per value of ``--checkpoint-every``). The
loop also runs as a plain Ray task: what Ray core costs without Ray Train's runtime; and once
more through Ray Train with the unlabeled rows left in the object store as a split of a
user's files leaves them, each rank reading its share through Ray Data
(``TorchTrainer(datasets=...)``, ``get_dataset_shard``: issue 13's third target). The ratio
compares median epoch times after the first epoch (start-up is reported separately):
``plain seconds / Ray seconds``, 1.0 = no overhead. The plain loop runs before and after the
Ray runs, so load from other processes on a shared machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from raysl.config import Config, DataConfig, TrainConfig, apply_overrides, parse_set
from raysl.data import load_dataset, make_split
from raysl.train import TrainData, init_model, train_loop


def plain_epochs(data: TrainData, cfg: TrainConfig, input_shape: tuple[int, ...], n_classes: int,
                 threads: int) -> list[tuple[float, float]]:
    """(training, validation) seconds of each epoch of the in-process loop: the Ray worker's
    :func:`~raysl.train.train_loop` without Ray (no checkpoint, no report)."""
    torch.set_num_threads(threads)
    model = init_model(cfg, input_shape, n_classes)
    _, history, _ = train_loop(model, data, cfg)
    return [(h["train_seconds"], h["epoch_seconds"] - h["train_seconds"]) for h in history]


def ray_epochs(history: list[dict[str, float]]) -> list[tuple[float, float, float]]:
    """(training, validation, checkpoint + report) seconds of each Ray Train epoch, from the
    worker's own clocks; the last epoch has no successor, so its report time is unknown (0)."""
    starts = [h["started_at"] for h in history]
    whole = [b - a for a, b in itertools.pairwise(starts)] + [history[-1]["epoch_seconds"]]
    return [(h["train_seconds"], h["epoch_seconds"] - h["train_seconds"],
             w - h["epoch_seconds"]) for h, w in zip(history, whole, strict=True)]


def _median(rows: list[tuple[float, ...]], col: int | None = None) -> float:
    """Median after the first epoch (warm-up) of one column, or of the row sums."""
    rest = rows[1:] or rows
    return statistics.median(sum(r) if col is None else r[col] for r in rest)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="raysl bench ray-overhead", description=__doc__)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint-every", default="1,4",
                    help="comma-separated train.checkpoint_every values, one Ray run each")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    every = [int(v) for v in args.checkpoint_every.split(",")]
    cfg = apply_overrides(Config(), {"data.dataset": args.dataset, "train.epochs": args.epochs,
                                     "train.num_workers": 1,
                                     "train.cpus_per_worker": float(args.threads),
                                     **parse_set(args.set)})
    split = make_split(load_dataset(DataConfig(dataset=args.dataset)), cfg.data)
    e = split.x_u[:0]
    data = TrainData(split.x_l, split.y_l, e, np.zeros(0, np.int64), np.zeros(0, np.float32),
                     split.x_val, split.y_val, len(split.x_u), x_u=split.x_u, y_u=split.y_u)
    t = cfg.train
    print(f"{args.dataset}: {t.epochs} epochs of {len(split.x_u)} unlabeled rows, batch "
          f"{t.batch_size}, mu {t.mu}, fixmatch={t.fixmatch}, {args.threads} thread(s)",
          flush=True)
    plain = plain_epochs(data, t, split.input_shape, split.n_classes, args.threads)

    import ray

    from raysl.distributed.session import start_local
    from raysl.distributed.trainer import train_classifier

    t0 = time.perf_counter()
    start_local(num_cpus=args.threads, logging_level="WARNING")  # own, fresh, raysl's env
    init_s = time.perf_counter() - t0
    runs: dict[int, tuple[list[tuple[float, float, float]], float]] = {}
    try:
        # the same loop as a plain Ray task: what Ray core costs, without Ray Train's runtime
        in_task = ray.get(ray.remote(num_cpus=args.threads)(plain_epochs).remote(
            data, t, split.input_shape, split.n_classes, args.threads))
        print("Ray task epochs: " + " ".join(f"{sum(r):.2f}" for r in in_task), flush=True)
        for n in every:
            with tempfile.TemporaryDirectory() as tmp:
                o = train_classifier(data, replace(t, checkpoint_every=n), split.input_shape,
                                     split.n_classes, Path(tmp), f"overhead-{n}", verbose=False)
            ep = ray_epochs(o.history)
            runs[n] = ep, o.seconds - sum(map(sum, ep))
            print(f"Ray run, checkpoint every {n}: epochs "
                  + " ".join(f"{sum(r):.2f}" for r in ep), flush=True)
        # the unlabeled rows as a split of a user's files gives them to the joint job: left in
        # the object store, each rank reads its share through Ray Data (its dataset shard)
        from raysl.distributed.pool import RemoteRows

        assert data.x_u is not None
        stored = replace(data, x_u=RemoteRows.put(data.x_u))
        n = max(every)
        with tempfile.TemporaryDirectory() as tmp:
            o = train_classifier(stored, replace(t, checkpoint_every=n), split.input_shape,
                                 split.n_classes, Path(tmp), "overhead-stored", verbose=False)
        from_store = ray_epochs(o.history)
        print("Ray run, rows from the object store: epochs "
              + " ".join(f"{sum(r):.2f}" for r in from_store), flush=True)
    finally:
        ray.shutdown()
    # plain epochs before and after the Ray runs: load from other processes hits both sides
    plain += plain_epochs(data, t, split.input_shape, split.n_classes, args.threads)
    p_train, p_epoch = _median(plain, 0), _median(plain)
    print(f"\nplain epochs (train + val): {' '.join(f'{sum(r):.2f}' for r in plain)}")
    print("\n| loop | train s | val s | checkpoint + report s | epoch s "
          "| throughput vs plain (target >= 0.9) |\n|---|---|---|---|---|---|")
    print(f"| plain PyTorch | {p_train:.2f} | {_median(plain, 1):.2f} | - | {p_epoch:.2f} "
          "| 1.000 |")
    print(f"| Ray task, same loop (no Ray Train) | {_median(in_task, 0):.2f} "
          f"| {_median(in_task, 1):.2f} | - | {_median(in_task):.2f} "
          f"| {p_epoch / _median(in_task):.3f} |")
    for n, (ep, _) in runs.items():
        r_epoch = _median(ep)
        print(f"| Ray Train, 1 worker, checkpoint every {n} | {_median(ep, 0):.2f} "
              f"| {_median(ep, 1):.2f} | {statistics.mean(r[2] for r in ep[1:-1] or ep):.2f} "
              f"| {r_epoch:.2f} | {p_epoch / r_epoch:.3f} |")
    r_epoch = _median(from_store)
    print(f"| Ray Train, 1 worker, checkpoint every {max(every)}, unlabeled rows read through "
          f"Ray Data (get_dataset_shard) | {_median(from_store, 0):.2f} "
          f"| {_median(from_store, 1):.2f} "
          f"| {statistics.mean(r[2] for r in from_store[1:-1] or from_store):.2f} "
          f"| {r_epoch:.2f} | {p_epoch / r_epoch:.3f} |")
    print(f"\nray.init {init_s:.1f} s; Ray Train start-up + teardown "
          + ", ".join(f"{s:.1f} s" for _, s in runs.values())
          + "; training step alone: plain/Ray = "
          + ", ".join(f"{p_train / _median(ep, 0):.3f}" for ep, _ in runs.values()))
    return 0
