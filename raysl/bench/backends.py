"""``raysl bench backends``: how good and how well calibrated each backend's pseudo-labels are.

For each dataset (digits, mnist5k and, when Debian's ``dataset-fashion-mnist`` is installed,
a stratified 12,000 of Fashion-MNIST's training images as ``raysl bench robustness`` takes
them), ``--labels-per-class`` labels per class and each seed (``data.seed = train.seed``), it
makes the pipeline's split, trains the pipeline's stage-1 baseline classifier in this process
(cached under ``--out``), then fits each backend over the unlabeled shards (Ray actors by
default): ``gmm`` in each ``--gmm`` variant (features, components per class, optional PCA
dimension), ``vae`` and ``gan`` in each ``--vae`` / ``--gan`` feature space (inputs,
classifier embedding), ``self``. scikit-learn's LabelSpreading (knn kernel, 7
neighbours) on the same split is the reference. Beside each gmm row, scikit-learn's
``GaussianMixture`` on the same features (:func:`sklearn_gmm`: raysl's PCA, components, initial
parameters and EM rounds), timed in the same run; a last table sets the two side by side.

Measured on the unlabeled rows against their hidden labels (used only here): argmax accuracy;
the expected calibration error (ECE) of the raw probabilities, after an unguarded temperature
fit on the validation split (T in [0.05, 20], what ``backend.calibrate`` did before) and after
the pipeline's :func:`raysl.calibration.calibrate` (T in [0.5, 30]; a fit on the lower bound,
which every validation row right gives, keeps T = 1); coverage and precision at
``select.threshold`` after the latter. Figures are mean ± std over seeds. ``fit s`` is the
backend's fit over the shards (the embedding included, the baseline's training not: the
pipeline trains it anyway; its time is in the note).

Every finished (dataset, seed, method) appends a line to ``OUT/rows.jsonl``: running the same
command again skips it, so a long benchmark can be run a dataset or a seed at a time and the
last run prints (and writes to ``OUT/table.md``) the table over all of them.

    raysl bench backends [--datasets digits,mnist5k,fashion_mnist] [--seeds 3] [--first-seed 0]
        [--labels-per-class 10] [--backends gmm,self] [--gmm pca:1,embedding:1,embedding:3]
        [--vae inputs,embedding] [--gan inputs,embedding]
        [--quick] [--local] [--out DIR] [--set backend.vae.rounds=20]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from raysl.calibration import FLOOR, apply_temperature, calibrate, fit_temperature
from raysl.config import Config, RayConfig, apply_overrides, parse_set
from raysl.data import Split
from raysl.metrics import expected_calibration_error, pseudo_label_metrics
from raysl.select import select

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
DATASETS = ("digits", "mnist5k", "fashion_mnist")
BACKEND_NAMES = ("gmm", "vae", "gan", "self")
GMM_VARIANTS = "pca:1,embedding:1"
NEURAL = ("vae", "gan")
NEURAL_VARIANTS = "inputs,embedding"  # --vae / --gan: backend.<name>.features values
SKLEARN = "sklearn-gmm"  # the method beside each gmm row (sklearn_gmm)
# the unguarded fit the pipeline used before raysl.calibration.calibrate
OLD_T_BOUNDS = (0.05, 20.0)
# --quick: digits only, short fits (a smoke run of the whole command in about a minute)
QUICK = {"backend.vae.rounds": 2, "backend.gan.rounds": 2, "backend.gmm.max_iter": 10,
         "train.epochs": 3}

Log = Callable[[str], None]


def parse_gmm(spec: str) -> tuple[str, dict[str, Any]]:
    """A ``--gmm`` entry ``features:components[:pca_dim]`` -> (row label, config overrides)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"{spec!r}: expected features:components[:pca_dim], e.g. embedding:3")
    ov: dict[str, Any] = {"backend.gmm.features": parts[0],
                          "backend.gmm.components_per_class": int(parts[1])}
    label = f"gmm {parts[0]} k={parts[1]}"
    if len(parts) == 3:
        ov["backend.gmm.pca_dim"] = int(parts[2])
        label += f" d={parts[2]}"
    return label, ov


def sklearn_label(gmm_label: str) -> str:
    """The row label of scikit-learn's GaussianMixture beside the gmm row ``gmm_label``."""
    return f"sklearn GaussianMixture ({gmm_label})"


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


def label_spreading_val(split: Split) -> np.ndarray:
    """LabelSpreading's distributions (n_val, C) for the validation rows, as unlabeled rows of
    a second fit (the transductive model has no other way to predict new rows)."""
    from sklearn.semi_supervised import LabelSpreading

    x = np.concatenate([split.x_l, split.x_u, split.x_val])
    x = x.reshape(len(x), -1)
    y = np.concatenate([split.y_l, np.full(len(split.x_u) + len(split.x_val), -1)])
    proba = LabelSpreading(kernel="knn", n_neighbors=7).fit(x, y).label_distributions_
    proba = proba[-len(split.x_val):]
    return proba / np.maximum(proba.sum(1, keepdims=True), 1e-12)


def at_threshold(proba: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    """(coverage, precision) of the pseudo-labels kept at confidence > t."""
    m = pseudo_label_metrics(select(proba, "threshold", t), y)
    return m["coverage"], m["precision"]


def score(proba: np.ndarray, val_proba: np.ndarray, split: Split,
          threshold: float, floor: float | tuple[float, ...] = FLOOR) -> dict[str, Any]:
    """Everything the tables show for one fit: ``proba`` (n_u, C) of the unlabeled rows and
    ``val_proba`` (n_val, C) of the validation rows, both uncalibrated; ``floor``, the
    backend's floor under log p for `calibrate`, or its candidates
    (``raysl.backends.CALIBRATION_FLOOR``)."""
    y = split.y_u
    old_t = fit_temperature(val_proba, split.y_val, *OLD_T_BOUNDS)
    cal = calibrate(val_proba, split.y_val, floor=floor)
    scaled = apply_temperature(proba, cal.temperature, floor=cal.floor)
    cov, prec = at_threshold(scaled, y, threshold)
    return {
        "accuracy": float((proba.argmax(1) == y).mean()),
        "val_accuracy": float((val_proba.argmax(1) == split.y_val).mean()),
        "ece": expected_calibration_error(proba, y),
        "t_old": old_t, "ece_old": expected_calibration_error(
            apply_temperature(proba, old_t), y),
        "t_fitted": cal.fitted, "t": cal.temperature, "floor": cal.floor,
        "ece_cal": expected_calibration_error(scaled, y),
        "coverage": cov, "precision": prec,
        "per_threshold": [list(at_threshold(scaled, y, t)) for t in THRESHOLDS],
    }


def _baseline_state(split: Split, cfg: Config, work: Path) -> tuple[dict[str, Any], float]:
    """The pipeline's stage-1 classifier for this split and config, trained in this process
    into ``work/baseline`` (or found there): (its weights, training seconds)."""
    from raysl import pipeline

    rec = pipeline.baseline(split, cfg, work, verbose=False)
    return pipeline.load_state(work / "baseline" / "model.pt"), float(rec["seconds"])


def _context(split: Split, cfg: Config, state: dict[str, Any] | None) -> Any:
    """The pipeline's FitContext for ``cfg.backend`` on ``split`` (the baseline's weights only
    for a backend that reads them)."""
    from raysl.backends import FitContext, needs_classifier
    from raysl.pipeline import model_width

    return FitContext(split.n_classes, split.input_shape, cfg.data.seed,
                      model_width(cfg.train, split),
                      state if needs_classifier(cfg.backend) else None)


def fit_one(name: str, split: Split, cfg: Config, state: dict[str, Any] | None,
            use_ray: bool) -> tuple[float, np.ndarray, np.ndarray, dict[str, Any], list[float]]:
    """Fit backend ``name`` (``cfg.backend``'s settings) over ``cfg.data.n_shards`` shards:
    (seconds, (n_u, C) probabilities, (n_val, C) validation probabilities, fitted state, the
    ``perf_counter`` time at the end of each round)."""
    import torch

    from raysl.backends import BACKENDS
    from raysl.pipeline import fit_backend as fit_shards

    cfg = apply_overrides(cfg, {"backend.name": name})
    ctx = _context(split, cfg, state)
    threads = torch.get_num_threads()  # `self` sets one thread for its actors' sake
    try:
        stamps: list[float] = []
        t0 = time.perf_counter()
        res, _ = fit_shards(split, cfg, ctx, use_ray,
                            progress=lambda *_: stamps.append(time.perf_counter()))
        seconds = time.perf_counter() - t0
        labeler = BACKENDS[name](cfg.backend, ctx)
        labeler.load_state_dict(res.state)
        return seconds, res.proba, labeler.predict_proba(split.x_val), res.state, stamps
    finally:
        torch.set_num_threads(threads)


def sklearn_gmm(split: Split, cfg: Config, state: dict[str, Any] | None,
                rounds: int) -> tuple[float, np.ndarray, np.ndarray]:
    """scikit-learn's ``GaussianMixture`` beside raysl's gmm (``cfg.backend.gmm``): the same
    features and PCA (raysl's moment PCA of the labeled + unlabeled rows, computed here in one
    piece), the same components, full covariances, started from raysl's initial parameters
    (labeled class means, the global covariance, uniform weights) and run for raysl's number of
    EM ``rounds`` (tolerance 0). It fits the labeled and unlabeled rows as unlabeled (it has no
    labeled term); component k keeps the class it was started from, as in raysl. Its
    covariance regularisation is raysl's prior ρ spread over a component's mean share of rows.
    Returns (EM seconds: the features and their projection are not counted, (n_u, C) and
    (n_val, C) probabilities)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    from raysl.backends.gmm import GMMBackend, moments

    cfg = apply_overrides(cfg, {"backend.name": "gmm"})
    gmm = GMMBackend(cfg.backend.gmm, _context(split, cfg, state))
    gmm.init(split.x_l, split.y_l)
    f_u = gmm.features(split.x_u)
    gmm.merge([moments(f_u)])  # the moments round: PCA and initial parameters
    st = gmm.state_dict()
    project = gmm.project_features
    z = np.concatenate([project(gmm.features(split.x_l)), project(f_u)])
    n_comp = len(st["means"])
    sk = GaussianMixture(n_components=n_comp, covariance_type="full", max_iter=max(rounds, 1),
                         tol=0.0, reg_covar=st["rho"] * n_comp / len(z),
                         weights_init=st["weights"], means_init=st["means"],
                         precisions_init=np.linalg.inv(st["covs"]), random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0: max_iter is the point
        t0 = time.perf_counter()
        sk.fit(z)
        seconds = time.perf_counter() - t0

    def per_class(z_rows: np.ndarray) -> np.ndarray:
        r = sk.predict_proba(z_rows)
        return np.stack([r[:, gmm.comp_class == c].sum(1) for c in range(split.n_classes)], 1)

    return seconds, per_class(z[len(split.x_l):]), per_class(
        project(gmm.features(split.x_val)))


def _dataset_value(name: str, out: Path, log: Log) -> str | None:
    """``data.dataset`` for the bench's dataset ``name``; None when its data is missing."""
    if name != "fashion_mnist":
        return name
    from raysl.bench.robustness import data_value, prepare_data

    return data_value(name, out) if prepare_data(name, out, log) else None


def _mean_std(vals: list[float], pct: bool = False, digits: int = 3) -> str:
    v = np.asarray([x for x in vals if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return "n/a"
    scale, d = (100.0, 1) if pct else (1.0, digits)
    if len(v) == 1:
        return f"{scale * v[0]:.{d}f}"
    return f"{scale * v.mean():.{d}f} ± {scale * v.std():.{d}f}"


def tables(rows: list[dict[str, Any]], threshold: float) -> str:
    """The Markdown tables over ``rows`` (one per dataset, seed and method), grouped by
    (method, dataset) in first-seen order: mean ± std over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["dataset"]), []).append(r)
    t = threshold
    out = [f"| method | dataset | labels | seeds | fit s | argmax acc % | ECE | T (unguarded) "
           f"| ECE (unguarded T) | T (calibrate) | ECE (calibrate) | coverage@{t} % "
           f"| precision@{t} % |", "|" + "---|" * 13]
    for (method, ds), rs in groups.items():
        def col(key: str, pct: bool = False, digits: int = 3, rs: list = rs) -> str:
            return _mean_std([r[key] for r in rs], pct, digits)

        out.append(f"| {method} | {ds} | {rs[0]['labels']} | {len(rs)} | "
                   f"{col('seconds', digits=1)} | {col('accuracy', True)} | {col('ece')} | "
                   f"{col('t_old', digits=2)} | {col('ece_old')} | {col('t', digits=2)} | "
                   f"{col('ece_cal')} | {col('coverage', True)} | {col('precision', True)} |")
    out += ["", "Precision % / coverage % of the kept pseudo-labels (confidence > threshold, "
            "after `calibrate`), mean over seeds:", "",
            "| method | dataset | " + " | ".join(f"{x}" for x in THRESHOLDS) + " |",
            "|" + "---|" * (2 + len(THRESHOLDS))]
    for (method, ds), rs in groups.items():
        cells = []
        for i in range(len(THRESHOLDS)):
            cov = np.mean([r["per_threshold"][i][0] for r in rs])
            prec = [r["per_threshold"][i][1] for r in rs]
            prec = [p for p in prec if p is not None and np.isfinite(p)]
            cells.append(f"{100 * np.mean(prec):.1f} / {100 * cov:.1f}" if prec
                         else f"n/a / {100 * cov:.1f}")
        out.append(f"| {method} | {ds} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def gmm_vs_sklearn(rows: list[dict[str, Any]]) -> str:
    """The gmm rows beside scikit-learn's GaussianMixture on the same features (Markdown, or
    "" without such rows): EM rounds, fit seconds and argmax accuracy, mean over seeds."""
    by = {(r["dataset"], r["seed"], r["method"]): r for r in rows}
    pairs: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for r in rows:
        ours = by.get((r["dataset"], r["seed"], r.get("sklearn_of")))
        if ours is not None:
            pairs.setdefault((r["sklearn_of"], r["dataset"]), []).append((ours, r))
    if not pairs:
        return ""
    out = ["", "", "raysl's gmm beside scikit-learn's GaussianMixture (same features, PCA, "
           "components, initial parameters and EM rounds), mean over seeds. raysl fit s: the "
           "whole fit (actors, features, moments round, EM); raysl EM s: its EM rounds only; "
           "scikit-learn EM s: its fit on the projected rows:", "",
           "| gmm | dataset | seeds | EM rounds | raysl fit s | raysl EM s | scikit-learn EM s "
           "| raysl argmax acc % | scikit-learn argmax acc % |", "|" + "---|" * 9]
    for (label, ds), ps in pairs.items():
        def m(key: str, i: int, scale: float = 1.0, ps: list = ps) -> float:
            return scale * float(np.mean([p[i].get(key, np.nan) for p in ps]))

        out.append(f"| {label} | {ds} | {len(ps)} | {m('rounds', 1):.1f} | "
                   f"{m('seconds', 0):.2f} | {m('em_seconds', 0):.2f} | {m('seconds', 1):.2f} | "
                   f"{m('accuracy', 0, 100):.1f} | {m('accuracy', 1, 100):.1f} |")
    return "\n".join(out)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_safe(obj: Any) -> Any:
    from raysl.pipeline import json_safe

    return json_safe(obj)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="raysl bench backends", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="digits only, one seed, short fits (smoke run)")
    ap.add_argument("--local", action="store_true",
                    help="fit with the in-process executor instead of Ray actors")
    ap.add_argument("--backends", default=",".join(BACKEND_NAMES),
                    help="comma-separated backends (default: %(default)s)")
    ap.add_argument("--gmm", default=GMM_VARIANTS,
                    help="the gmm rows: comma-separated features:components[:pca_dim] "
                    "(default: %(default)s)")
    for n in NEURAL:
        ap.add_argument(f"--{n}", default=NEURAL_VARIANTS,
                        help=f"the {n} rows: comma-separated feature spaces, backend.{n}.features "
                        "(default: %(default)s)")
    ap.add_argument("--datasets", default=",".join(DATASETS),
                    help="comma-separated among %(default)s (fashion_mnist: skipped when "
                    "Debian's dataset-fashion-mnist is not installed)")
    ap.add_argument("--labels-per-class", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1,
                    help="seeds per dataset (data.seed = train.seed; default: %(default)s)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds run from here (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. backend.vae.rounds=20 (repeatable)")
    ap.add_argument("--out", default="runs/bench-backends",
                    help="directory: rows.jsonl, table.md, the baselines and data "
                    "(default: %(default)s)")
    args = ap.parse_args(argv)

    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    overrides.update(parse_set(args.set))
    base = apply_overrides(Config(), {**overrides, "ray.enabled": False})
    from raysl.backends import BACKENDS, calibration_floor

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; allowed: {', '.join(BACKENDS)}")
    try:
        gmm_rows = [parse_gmm(s.strip()) for s in args.gmm.split(",") if s.strip()]
        for _, ov in gmm_rows:
            apply_overrides(base, ov)
    except Exception as e:  # ValueError, ConfigError: a bad --gmm entry
        ap.error(f"--gmm: {e}")
    methods: list[tuple[str, str, dict[str, Any]]] = []  # (row label, backend, overrides)
    for n in names:
        if n in NEURAL:
            for feats in (f.strip() for f in getattr(args, n).split(",") if f.strip()):
                ov = {f"backend.{n}.features": feats}
                try:
                    apply_overrides(base, ov)
                except Exception as e:  # ConfigError: a feature space that does not exist
                    ap.error(f"--{n}: {e}")
                methods.append((f"{n} {feats}", n, ov))
            continue
        if n != "gmm":
            methods.append((n, n, {}))
            continue
        for label, ov in gmm_rows:  # each gmm row, then scikit-learn's on its features
            methods += [(label, "gmm", ov), (sklearn_label(label), SKLEARN, ov)]
    wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in wanted if d not in DATASETS]
    if bad:
        ap.error(f"--datasets: unknown {bad}; allowed: {', '.join(DATASETS)}")
    if args.quick:
        wanted = [d for d in wanted if d == "digits"] or ["digits"]
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: at least 1")
    seeds = list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {(r["dataset"], r["labels_per_class"], r["seed"], r["method"], r["overrides"]): r
            for r in _read_rows(rows_path)}
    threshold = base.select.threshold

    def log(msg: str) -> None:
        print(f"[bench] {msg}", flush=True)

    started = False
    if not args.local:
        from raysl.distributed.session import ensure_ray

        started = ensure_ray(RayConfig(num_cpus=2))
    from raysl import pipeline

    ov_key = json.dumps(overrides, sort_keys=True, default=str)
    try:
        for ds in wanted:
            value = _dataset_value(ds, out, log)
            if value is None:
                continue
            for seed in seeds:
                cfg = apply_overrides(base, {"data.dataset": value, "data.seed": seed,
                                             "train.seed": seed,
                                             "data.labels_per_class": args.labels_per_class})
                todo = [m for m in [("labelspreading (knn 7)", "", {}), *methods]
                        if (ds, args.labels_per_class, seed, m[0], ov_key) not in done]
                if not todo:
                    continue
                split = pipeline.check(cfg)
                state, base_secs = _baseline_state(
                    split, cfg, out / "work" / f"{ds}-{args.labels_per_class}-{seed}")
                for label, name, ov in todo:
                    extra: dict[str, Any] = {}
                    if not name:
                        secs, proba = label_spreading(split)
                        val_proba = label_spreading_val(split)
                    elif name == SKLEARN:
                        gmm_label = next(g for g, _ in gmm_rows if sklearn_label(g) == label)
                        rounds = done.get((ds, args.labels_per_class, seed, gmm_label, ov_key),
                                          {}).get("rounds")
                        if rounds is None:  # a row of an older version: no rounds recorded
                            log(f"{ds} seed {seed}: {label} skipped ({gmm_label}'s EM rounds "
                                "unknown)")
                            continue
                        secs, proba, val_proba = sklearn_gmm(split, apply_overrides(cfg, ov),
                                                             state, rounds)
                        extra = {"rounds": rounds, "sklearn_of": gmm_label}
                    else:
                        secs, proba, val_proba, fitted, stamps = fit_one(
                            name, split, apply_overrides(cfg, ov), state, not args.local)
                        if name == "gmm":  # the EM rounds after the moments round, and their time
                            extra = {"rounds": int(fitted["iter"]),
                                     "em_seconds": stamps[-1] - stamps[0]}
                    row = {"dataset": ds, "labels_per_class": args.labels_per_class,
                           "labels": len(split.y_l), "seed": seed, "method": label,
                           "overrides": ov_key, "seconds": secs, "baseline_seconds": base_secs,
                           "executor": "local" if args.local else "ray", **extra,
                           **score(proba, val_proba, split, threshold,
                                   calibration_floor(
                                       "gmm" if name == SKLEARN else name))}
                    done[(ds, args.labels_per_class, seed, label, ov_key)] = row
                    with rows_path.open("a") as f:
                        f.write(json.dumps(_json_safe(row)) + "\n")
                    log(f"{ds} seed {seed}: {label} {secs:.1f}s, argmax accuracy "
                        f"{row['accuracy']:.3f}, ECE {row['ece']:.3f} -> {row['ece_cal']:.3f} "
                        f"(T={row['t']:.2f})")
    finally:
        if started:
            import ray

            ray.shutdown()
    rows = [r for r in _read_rows(rows_path) if r["dataset"] in wanted and r["seed"] in seeds
            and r["labels_per_class"] == args.labels_per_class and r["overrides"] == ov_key
            and r["method"] in {m[0] for m in methods} | {"labelspreading (knn 7)"}]
    text = tables(rows, threshold) + gmm_vs_sklearn(rows)
    mode = " and ".join(sorted({"Ray actors (2 CPUs)" if r.get("executor", "ray") == "ray"
                                else "the in-process executor" for r in rows}))
    baseline_seconds: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("baseline_seconds") is not None:
            baseline_seconds.setdefault(r["dataset"], {})[r["seed"]] = r["baseline_seconds"]
    base_note = "; ".join(f"{d} {np.mean(list(s.values())):.1f} s"
                          for d, s in baseline_seconds.items())
    note = (f"\nFits over {base.data.n_shards} unlabeled shards with {mode}. `self` and "
            "the `embedding` rows read the pipeline's baseline classifier, trained in this "
            "process"
            + (f" (mean training time: {base_note})" if base_note else "") + "; its "
            "training is not in `fit s`. T (unguarded): fitted on the validation split in "
            f"[{OLD_T_BOUNDS[0]}, {OLD_T_BOUNDS[1]}]; T (calibrate): raysl.calibration.calibrate, "
            "the pipeline's `backend.calibrate` (T in [0.5, 30]; 1.00 when the fit was "
            "degenerate). scikit-learn's GaussianMixture: in this process on raysl's projected "
            "features (computing them is not in its `fit s`), from raysl's initial parameters, "
            "for raysl's EM rounds; it has no labeled term.")
    print("\n" + text + "\n" + note)
    (out / "table.md").write_text(text + "\n" + note + "\n")
    return 0


__all__ = ["DATASETS", "THRESHOLDS", "at_threshold", "gmm_vs_sklearn", "label_spreading", "main",
           "parse_gmm", "score", "sklearn_gmm", "tables"]
