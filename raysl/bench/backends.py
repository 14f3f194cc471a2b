"""``raysl bench backends``: how good and how well calibrated each backend's pseudo-labels are.

For each dataset (digits with 50 labels, mnist5k with 100) and each backend (gmm, vae, gan,
self) it fits the backend over the unlabeled shards (Ray actors by default), then measures on
the unlabeled rows, whose true labels are known for these datasets and used only here:
argmax accuracy, coverage and precision at a confidence threshold, and the expected calibration
error, before and after temperature scaling on the validation split. A scikit-learn
LabelSpreading (knn kernel, 7 neighbours) row on the same split is the reference.

    raysl bench backends [--quick] [--local] [--out FILE.md] [--set backend.vae.rounds=20]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from raysl.backends import BACKENDS, FitContext
from raysl.calibration import apply_temperature, fit_temperature
from raysl.config import Config, RayConfig, apply_overrides, parse_set
from raysl.data import Split, load_dataset, make_split
from raysl.metrics import expected_calibration_error, pseudo_label_metrics
from raysl.select import select

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
DATASETS = (("digits", 5), ("mnist5k", 10))  # (name, labels per class): 50 and 100 labels
BACKEND_NAMES = ("gmm", "vae", "gan", "self")
# --quick: digits only, short fits (a smoke run of the whole command in about a minute)
QUICK = {"backend.vae.rounds": 2, "backend.gan.rounds": 2, "backend.gmm.max_iter": 10,
         "train.epochs": 3}


@dataclass(frozen=True)
class Row:
    backend: str
    dataset: str
    labels: int
    seconds: float
    proba: np.ndarray  # (n_u, C), uncalibrated
    temperature: float  # fitted on the validation split


def _classifier_state(split: Split, cfg: Config) -> dict[str, np.ndarray]:
    """The initial (labeled-only) classifier that ``self`` labels with, trained in-process
    with the pipeline's stage-1 settings (lambda_u = 0, same budget)."""
    from raysl.bench.accuracy import train_torch
    from raysl.train import state_to_numpy

    model, _ = train_torch(split, replace(cfg.train, lambda_u=0.0))
    return state_to_numpy(model.state_dict())


def fit_backend(name: str, split: Split, cfg: Config, use_ray: bool) -> tuple[float, Any]:
    """Fit one backend over ``cfg.data.n_shards`` shards; returns (seconds, (proba, fitted
    backend)). For ``self`` the seconds include training the initial classifier."""
    from raysl.pipeline import fit_backend as fit_shards

    t0 = time.perf_counter()
    cfg = replace(cfg, backend=replace(cfg.backend, name=name))
    state = _classifier_state(split, cfg) if name == "self" else None
    ctx = FitContext(split.n_classes, split.input_shape, cfg.data.seed, cfg.train.hidden, state)
    res, _ = fit_shards(split, cfg, ctx, use_ray)
    seconds = time.perf_counter() - t0
    labeler = BACKENDS[name](cfg.backend, ctx)
    labeler.load_state_dict(res.state)
    return seconds, (res.proba, labeler)


def label_spreading(split: Split) -> tuple[float, np.ndarray]:
    """scikit-learn LabelSpreading (knn, 7 neighbours) on labeled + unlabeled rows:
    (seconds, (n_u, C) label distributions of the unlabeled rows)."""
    from sklearn.semi_supervised import LabelSpreading

    t0 = time.perf_counter()
    x = np.concatenate([split.x_l, split.x_u]).reshape(len(split.x_l) + len(split.x_u), -1)
    y = np.concatenate([split.y_l, np.full(len(split.x_u), -1)])
    model = LabelSpreading(kernel="knn", n_neighbors=7).fit(x, y)
    proba = model.label_distributions_[len(split.x_l):]
    proba = proba / np.maximum(proba.sum(1, keepdims=True), 1e-12)
    return time.perf_counter() - t0, proba


def at_threshold(proba: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    """(coverage, precision) of the pseudo-labels kept at confidence > t."""
    m = pseudo_label_metrics(select(proba, "threshold", t), y)
    return m["coverage"], m["precision"]


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.1f}"


def tables(rows: list[Row], split_of: dict[str, Split], threshold: float = 0.95) -> str:
    """The two Markdown tables: the summary and precision/coverage per threshold."""
    t = threshold
    head = (f"| backend | dataset | labels | fit s | argmax acc % | coverage@{t} % | "
            f"precision@{t} % | ECE | T | ECE (T-scaled) |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        y = split_of[r.dataset].y_u
        acc = float((r.proba.argmax(1) == y).mean())
        cov, prec = at_threshold(r.proba, y, threshold)
        ece = expected_calibration_error(r.proba, y)
        ece_t = expected_calibration_error(apply_temperature(r.proba, r.temperature), y)
        out.append(f"| {r.backend} | {r.dataset} | {r.labels} | {r.seconds:.1f} | {_pct(acc)} "
                   f"| {_pct(cov)} | {_pct(prec)} | {ece:.3f} | {r.temperature:.2f} "
                   f"| {ece_t:.3f} |")
    out += ["", "Precision % / coverage % of the kept pseudo-labels (confidence > threshold, "
            "uncalibrated):", "",
            "| backend | dataset | " + " | ".join(f"{t}" for t in THRESHOLDS) + " |",
            "|" + "---|" * (2 + len(THRESHOLDS))]
    for r in rows:
        y = split_of[r.dataset].y_u
        cells = []
        for t in THRESHOLDS:
            cov, prec = at_threshold(r.proba, y, t)
            cells.append(f"{_pct(prec)} / {_pct(cov)}")
        out.append(f"| {r.backend} | {r.dataset} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="raysl bench backends", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits only, short fits (smoke run)")
    ap.add_argument("--local", action="store_true",
                    help="fit with the in-process executor instead of Ray actors")
    ap.add_argument("--backends", default=",".join(BACKEND_NAMES),
                    help="comma-separated backends (default: %(default)s)")
    ap.add_argument("--datasets", default=",".join(d for d, _ in DATASETS),
                    help="comma-separated datasets among digits, mnist5k (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. backend.vae.rounds=20 (repeatable)")
    ap.add_argument("--out", help="also write the tables to this Markdown file")
    args = ap.parse_args(argv)

    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    overrides.update(parse_set(args.set))
    base = apply_overrides(Config(), overrides)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; allowed: {', '.join(BACKENDS)}")
    wanted = [d.strip() for d in args.datasets.split(",")]
    datasets = [(d, k) for d, k in DATASETS if d in wanted and not (args.quick and d != "digits")]

    started = False
    if not args.local:
        from raysl.distributed.session import ensure_ray

        started = ensure_ray(RayConfig(num_cpus=2))
    rows: list[Row] = []
    split_of: dict[str, Split] = {}
    try:
        for ds_name, per_class in datasets:
            dcfg = replace(base.data, dataset=ds_name, labels_per_class=per_class)
            cfg = replace(base, data=dcfg)
            split = make_split(load_dataset(dcfg), dcfg)
            split_of[ds_name] = split
            n_l = len(split.y_l)
            secs, proba = label_spreading(split)
            rows.append(Row("labelspreading (knn 7)", ds_name, n_l, secs, proba, 1.0))
            print(f"[bench] {ds_name}: labelspreading {secs:.1f}s", flush=True)
            for name in names:
                secs, (proba, labeler) = fit_backend(name, split, cfg, not args.local)
                t = fit_temperature(labeler.predict_proba(split.x_val), split.y_val)
                rows.append(Row(name, ds_name, n_l, secs, proba, t))
                acc = float((proba.argmax(1) == split.y_u).mean())
                print(f"[bench] {ds_name}: {name} {secs:.1f}s, argmax accuracy {acc:.3f}",
                      flush=True)
    finally:
        if started:
            import ray

            ray.shutdown()
    text = tables(rows, split_of)
    mode = "in-process executor" if args.local else "Ray actors (2 CPUs)"
    note = (f"\nFits over {base.data.n_shards} unlabeled shards with {mode}; `self` includes "
            "training its initial classifier. T: temperature fitted on the validation split.")
    print("\n" + text + "\n" + note)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text + "\n" + note + "\n")
    return 0


__all__ = ["DATASETS", "THRESHOLDS", "at_threshold", "label_spreading", "main", "tables"]
