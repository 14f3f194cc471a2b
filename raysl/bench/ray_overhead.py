"""``raysl bench ray-overhead``: a training epoch through Ray Train (1 worker) vs the same loop
in plain PyTorch (same model, data, batch, config and thread count), as a throughput ratio.

Both sides run :func:`raysl.train.run_epoch`; the Ray side is ``train_classifier`` (TorchTrainer,
1 worker holding ``--threads`` CPUs, so Ray gives it as many OpenMP threads, a checkpoint and a
``ray.train.report`` every epoch). The ratio compares the median epoch time after the first
epoch (start-up is reported separately): ``plain seconds / Ray seconds``, 1.0 = no overhead.
The plain loop runs before and after the Ray run, so load from other processes on a shared
machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raysl.config import Config, DataConfig, TrainConfig, apply_overrides, parse_set
from raysl.data import load_dataset, make_split
from raysl.models import build_model
from raysl.train import TrainData, make_optimizer, run_epoch


def plain_epochs(data: TrainData, cfg: TrainConfig, input_shape: tuple[int, ...], n_classes: int,
                 threads: int) -> list[float]:
    """Seconds of each epoch of the in-process loop (the Ray worker's loop without Ray)."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_model(input_shape, n_classes, cfg.hidden, cfg.init)
    opt = make_optimizer(model, cfg)
    out = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        run_epoch(model, opt, data, cfg, epoch)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="raysl bench ray-overhead", description=__doc__)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
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
          f"{t.batch_size}, mu {t.mu}, fixmatch={t.fixmatch}, {args.threads} thread(s)")
    before = plain_epochs(data, t, split.input_shape, split.n_classes, args.threads)

    import ray

    import raysl.distributed.session  # noqa: F401  (Ray env defaults before init)
    from raysl.distributed.trainer import train_classifier

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, logging_level="WARNING")  # own, fresh
    init_s = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            outcome = train_classifier(data, t, split.input_shape, split.n_classes, Path(tmp),
                                       "overhead", verbose=False)
    finally:
        ray.shutdown()
    after = plain_epochs(data, t, split.input_shape, split.n_classes, args.threads)
    # epoch to epoch, including the checkpoint write and the report barrier
    starts = [h["started_at"] for h in outcome.history]
    ray_epochs = [b - a for a, b in itertools.pairwise(starts)]
    ray_epochs.append(outcome.history[-1]["epoch_seconds"])
    plain = statistics.median(before[1:] + after[1:])
    via_ray = statistics.median(ray_epochs[1:] or ray_epochs)
    startup = outcome.seconds - sum(ray_epochs)
    rows = [("plain PyTorch epoch (median)", f"{plain:.2f} s"),
            ("Ray Train epoch (median, 1 worker)", f"{via_ray:.2f} s"),
            ("throughput ratio plain/Ray (target >= 0.9)", f"{plain / via_ray:.3f}"),
            ("ray.init", f"{init_s:.1f} s"),
            ("Ray Train start-up + teardown", f"{startup:.1f} s"),
            ("plain epochs", " ".join(f"{s:.2f}" for s in before + after)),
            ("Ray epochs", " ".join(f"{s:.2f}" for s in ray_epochs))]
    print("\n| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0
