"""``raysl bench accuracy``: test accuracy of every method on the same splits, mean ± std.

For each dataset, labels-per-class count and seed (one :func:`raysl.data.make_split` per
triple, so every method sees the same labeled, unlabeled and test rows) it trains or fits:

- ``supervised``: the labeled rows only (same network, budget, weak augmentation and EMA
  as FixMatch: ``train.fixmatch = true, train.lambda_u = 0``);
- ``label_spreading`` / ``self_training``: scikit-learn's LabelSpreading (kNN kernel) and
  SelfTrainingClassifier (SVC) on the flattened pixels;
- ``<backend>``: raysl's offline pipeline (backend pseudo-labels, ``select.threshold``,
  joint training), for each backend in ``--backends``;
- ``fixmatch``: raysl's online pseudo-labels (``train.fixmatch``, EMA teacher);
- ``fixmatch+<backend>``: FixMatch plus the backend's pseudo-labels, combined as
  ``train.offline`` says (``targets``: extra targets, ``warm``: targets fading out by half
  the steps, ``prior``: a prior on the weak-view labels);
- ``oracle``: every training row labeled (labeled + unlabeled pool), trained like
  ``supervised``; the same rows whatever the labels count, so it runs once per seed (at the
  largest count) and the table repeats it.

Neural methods start from He-initialised weights (``train.init = he``); the offline
backends' joint training is the pipeline's (no augmentation, no EMA), as ``raysl run`` does,
for a third of the epochs (:data:`OFFLINE_EPOCH_SHARE`).

Each run calls the training loop directly (plain PyTorch, ``torch.set_num_threads(--threads)``),
not through Ray Train, whose worker runs the same :func:`raysl.train.run_epoch` (``raysl bench
ray-overhead`` measures what Ray Train adds). The runs of one (dataset, labels, seed) form a
unit; ``--workers N`` runs N units at once as Ray generator tasks (each streams its rows back as
they finish), ``--workers 1`` runs them in this process without Ray. Every finished run is
appended to ``OUT/runs.jsonl``, so running the same command again skips finished runs; then
``OUT/table.md`` and ``OUT/accuracy_vs_labels.png`` are written.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysl.config import Config, DataConfig, TrainConfig, apply_overrides, parse_set
from raysl.data import Split, load_dataset, make_split
from raysl.metrics import pseudo_label_metrics
from raysl.select import Selection, select_labels
from raysl.train import TrainData, accuracy, init_model, state_to_numpy, train_loop

# The training budget of each dataset (the same for every online neural method on it).
# mnist5k: 41 steps per epoch at mu=3, batch 32.
_COMMON = {"train.ema": 0.99, "train.fixmatch_threshold": 0.95, "train.init": "he"}
BUDGETS: dict[str, dict[str, Any]] = {
    "digits": {**_COMMON, "train.epochs": 60},
    "mnist5k": {**_COMMON, "train.epochs": 30, "backend.gmm.pca_dim": 30},
}
# The offline backends' joint training gets a third of the epochs: without augmentation it
# converges sooner (mnist5k quick run: 10 epochs), and its step (32 labeled + 96 pseudo-labeled
# images, forward and backward) costs nearly as much as FixMatch's.
OFFLINE_EPOCH_SHARE = 1 / 3
QUICK_EPOCHS = {"digits": 30, "mnist5k": 10}
DEFAULT_METHODS = ("supervised", "label_spreading", "self_training", "backends", "fixmatch",
                   "oracle")

Log = Callable[[str], None]


def train_torch(split: Split, cfg: TrainConfig, x_l: np.ndarray | None = None,
                y_l: np.ndarray | None = None,
                pseudo: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                prior: tuple[np.ndarray, np.ndarray] | None = None,
                log: Log | None = None) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train the classifier in this process (the loop Ray Train runs on each worker).

    ``x_l, y_l`` replace the split's labeled rows (oracle); ``pseudo = (x_p, y_p, w_p)`` are
    offline pseudo-labels; ``prior = (labels, conf)`` (n_u,) the backend's label and confidence
    for every unlabeled row (``cfg.offline = "prior"``). Returns the evaluation model (the EMA
    teacher when ``cfg.ema``)."""
    x_l = split.x_l if x_l is None else x_l
    y_l = split.y_l if y_l is None else y_l
    if pseudo is None:
        pseudo = (split.x_u[:0], split.y_u[:0], np.zeros(0, np.float32))
    data = TrainData(x_l, y_l, *pseudo, split.x_val, split.y_val, len(split.x_u),
                     x_u=split.x_u, y_u=split.y_u,
                     prior_label=None if prior is None else prior[0],
                     prior_conf=None if prior is None else prior[1])
    model = init_model(cfg, split.input_shape, split.n_classes)

    def on_epoch(epoch: int, row: dict[str, Any], _: Any) -> None:
        if log is not None and (epoch + 1) % max(1, cfg.epochs // 5) == 0:
            extra = (f" mask={row['mask_rate']:.2f} pl_prec={row['pl_precision']:.3f}"
                     if "mask_rate" in row else "")
            log(f"    epoch {epoch + 1}/{cfg.epochs} loss={row['loss']:.3f}{extra} "
                f"val={row['val_accuracy']:.3f} ({row['epoch_seconds']:.1f}s)")

    kept, history, _ = train_loop(model, data, cfg, on_epoch=on_epoch)
    return kept, history


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)


def sklearn_method(name: str, split: Split) -> float:
    """Test accuracy of scikit-learn's LabelSpreading or SelfTrainingClassifier on the same
    split (labeled + unlabeled rows; unlabeled targets are -1)."""
    from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier
    from sklearn.svm import SVC

    x = _flat(np.concatenate([split.x_l, split.x_u]))
    y = np.concatenate([split.y_l, np.full(len(split.x_u), -1)])
    if name == "label_spreading":
        clf: Any = LabelSpreading(kernel="knn", n_neighbors=7, alpha=0.2, max_iter=100)
    else:
        clf = SelfTrainingClassifier(SVC(probability=True, gamma="scale", random_state=0),
                                     threshold=0.75)  # scikit-learn's own example
    with warnings.catch_warnings():
        # SVC(probability=True) is deprecated since scikit-learn 1.9; its replacement
        # (CalibratedClassifierCV, 5-fold) cannot fit 1 labeled row per class
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x, y)
    return float((clf.predict(_flat(split.x_test)) == split.y_test).mean())


def _backend_pseudo(split: Split, cfg: Config, backend: str, out: Path,
                    sup_state: dict[str, Any], log: Log) -> tuple[Selection, dict[str, float]]:
    """Fit a backend (locally, cached under ``out``) and select its confident rows; returns
    the Selection and its metrics on the unlabeled pool (coverage, precision, ...)."""
    from raysl.pipeline import pseudo_label

    cfg = replace(cfg, backend=replace(cfg.backend, name=backend))
    pl = pseudo_label(split, cfg, out, sup_state, use_ray=False)
    labels, conf = pl["pool"].gather("label", "conf")  # in this process: small data
    sel = select_labels(labels, conf, split.n_classes, cfg.select.criterion,
                        cfg.select.threshold, cfg.select.k_best)
    return sel, pseudo_label_metrics(sel, split.y_u)


def run_one(method: str, split: Split, cfg: Config, out: Path, log: Log,
            cache: dict[str, Any]) -> dict[str, Any]:
    """One method on one split; returns a result row (test accuracy, seconds, extras)."""
    t0 = time.perf_counter()
    tcfg = cfg.train
    extra: dict[str, Any] = {}
    if method in ("label_spreading", "self_training"):
        acc = sklearn_method(method, split)
    else:
        needs_sup = method == "supervised" or method.partition("+")[2] != "" or (
            not method.startswith("fixmatch") and method != "oracle")  # the `self` backend
        if needs_sup and "sup_state" not in cache:
            sup, _ = train_torch(split, replace(tcfg, lambda_u=0.0, fixmatch=True), log=log)
            cache["sup_state"] = state_to_numpy(sup.state_dict())
            cache["sup_acc"] = accuracy(sup, split.x_test, split.y_test)
        if method == "supervised":
            acc = cache["sup_acc"]
        elif method == "oracle":
            model, _ = train_torch(split, replace(tcfg, lambda_u=0.0, fixmatch=True),
                                   np.concatenate([split.x_l, split.x_u]),
                                   np.concatenate([split.y_l, split.y_u]), log=log)
            acc = accuracy(model, split.x_test, split.y_test)
        else:
            online = method.startswith("fixmatch")
            backend = method.partition("+")[2] if online else method
            pseudo, prior = None, None
            if backend:
                sel, info = _backend_pseudo(split, cfg, backend, out, cache["sup_state"], log)
                m = sel.mask
                pseudo = (split.x_u[m], sel.labels[m], sel.conf[m].astype(np.float32))
                prior = (sel.labels, sel.conf.astype(np.float32))
                extra.update({f"pl_{k}": v for k, v in info.items()})
            # fixmatch+<backend> combines them as train.offline says (warm by default)
            offline = (tcfg.offline if tcfg.offline != "none" else "targets") if backend \
                else "none"
            t1 = replace(tcfg, fixmatch=online, offline=offline)
            if not online:  # the offline pipeline as `raysl run` trains it
                t1 = replace(t1, ema=0.0, epochs=math.ceil(t1.epochs * OFFLINE_EPOCH_SHARE))
            model, hist = train_torch(split, t1, pseudo=pseudo, prior=prior, log=log)
            acc = accuracy(model, split.x_test, split.y_test)
            if online:
                extra.update(mask_rate=hist[-1]["mask_rate"],
                             online_pl_precision=hist[-1]["pl_precision"])
    return {"test_accuracy": acc, "seconds": time.perf_counter() - t0, **extra}


# -- reporting ------------------------------------------------------------------------------


def _stats(rows: list[dict[str, Any]]) -> tuple[float, float, int]:
    a = np.array([r["test_accuracy"] for r in rows])
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def share_oracle(rows: list[dict[str, Any]], labels: list[int]) -> list[dict[str, Any]]:
    """The oracle's rows (run once per seed, at the largest labels count) repeated for every
    labels count, so the table and plot show it beside each."""
    out = [r for r in rows if r["method"] != "oracle"]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        oracle = [r for r in rows if r["method"] == "oracle" and r["dataset"] == ds]
        if oracle:
            top = max(r["labels_per_class"] for r in oracle)
            out += [{**r, "labels_per_class": lpc} for r in oracle
                    if r["labels_per_class"] == top for lpc in labels]
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per (dataset, labels per class), one column per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = sorted({(r["dataset"], r["labels_per_class"]) for r in rows})
    lines = ["| dataset | labels | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for ds, lpc in keys:
        cells = []
        for m in methods:
            sel = [r for r in rows if (r["dataset"], r["labels_per_class"], r["method"])
                   == (ds, lpc, m)]
            if not sel:
                cells.append("")
                continue
            mean, std, n = _stats(sel)
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}" + ("" if n == 3 else f" (n={n})"))
        lines.append(f"| {ds} | {lpc * 10} ({lpc}/class) | " + " | ".join(cells) + " |")
    secs = {m: np.mean([r["seconds"] for r in rows if r["method"] == m]) for m in methods}
    lines += ["", "Mean seconds per run: " + ", ".join(f"{m} {s:.0f}" for m, s in secs.items())]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs labels per class, one panel per dataset, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted({r["labels_per_class"] for r in rows
                          if r["dataset"] == ds and r["method"] == m})
            if not pts:
                continue
            st = [_stats([r for r in rows if (r["dataset"], r["labels_per_class"],
                                              r["method"]) == (ds, p, m)]) for p in pts]
            mean = np.array([s[0] for s in st]) * 100
            std = np.array([s[1] for s in st]) * 100
            ax.errorbar(pts, mean, yerr=std, marker="o", capsize=3, label=m)
        ax.set(xscale="log", xlabel="labels per class", ylabel="test accuracy (%)", title=ds)
        ticks = sorted({r["labels_per_class"] for r in rows if r["dataset"] == ds})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------


def _methods(names: list[str], backends: list[str]) -> list[str]:
    out: list[str] = []
    for m in names:
        if m == "backends":
            out += backends
        elif m == "fixmatch+backends":
            out += [f"fixmatch+{b}" for b in backends]
        else:
            out.append(m)
    return out


@dataclass(frozen=True)
class Unit:
    """One (dataset, labels per class, seed): one split that every method in it shares."""

    dataset: str
    labels_per_class: int
    seed: int
    quick: bool
    overrides: dict[str, Any]  # --set, applied after the dataset budget

    def tag(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "labels_per_class": self.labels_per_class,
                "seed": self.seed, "quick": self.quick, "overrides": self.overrides}

    def config(self) -> Config:
        over = {**BUDGETS.get(self.dataset, {}), "data.dataset": self.dataset,
                "data.labels_per_class": self.labels_per_class, "data.seed": self.seed,
                "train.seed": self.seed, "train.num_workers": 0}
        if self.quick:
            over["train.epochs"] = QUICK_EPOCHS.get(self.dataset, 10)
        return apply_overrides(Config(), {**over, **self.overrides})


def run_unit(unit: Unit, methods: list[str], out: str, threads: int) -> Iterator[dict[str, Any]]:
    """Run ``methods`` on the unit's split, yielding a result row as each one finishes (in
    this process, or as a Ray generator task that streams rows back to the driver)."""
    torch.set_num_threads(threads)
    cfg = unit.config()
    split = make_split(load_dataset(DataConfig(dataset=unit.dataset)), cfg.data)
    cache: dict[str, Any] = {}
    name = f"[{unit.dataset} {unit.labels_per_class}/class seed {unit.seed}]"

    def log(msg: str) -> None:
        print(msg, flush=True)

    for method in methods:
        log(f"{name} {method} ...")
        res = {**unit.tag(), "method": method,
               **run_one(method, split, cfg, Path(out), log, cache)}
        log(f"{name} {method}: {100 * res['test_accuracy']:.1f}% ({res['seconds']:.0f}s)")
        yield res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="raysl bench accuracy", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="digits + mnist5k at 10 labels/class, 1 seed, shorter training")
    ap.add_argument("--out", default="runs/bench-accuracy")
    ap.add_argument("--datasets", default="digits,mnist5k")
    ap.add_argument("--labels", default="1,2,5,10", help="labels per class, comma-separated")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only-seed", type=int, default=None,
                    help="run just this seed; the table still covers --seeds from "
                    "OUT/runs.jsonl")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated; 'backends' expands to --backends, "
                    "'fixmatch+backends' to fixmatch+<each backend>")
    ap.add_argument("--backends", default="gmm,self",
                    help="what 'backends' expands to; vae and gan work too, each adding a "
                    "backend fit and a joint training to every unit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per unit")
    ap.add_argument("--workers", type=int, default=1,
                    help="units (dataset, labels, seed) at once, as Ray tasks of --threads CPUs "
                    "each; 1 runs them one after another in this process, without Ray")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied after the dataset budget (repeatable)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    datasets = args.datasets.split(",")
    labels = [int(v) for v in args.labels.split(",")]
    seeds = args.seeds
    if args.quick:
        labels, seeds = [10], min(seeds, 1)
    methods = _methods(args.methods.split(","), args.backends.split(","))
    overrides = parse_set(args.set)
    units = [Unit(ds, lpc, seed, args.quick, overrides) for ds in datasets for lpc in labels
             for seed in (range(seeds) if args.only_seed is None else [args.only_seed])]
    for u in units:  # every key, value and dataset checked before any training
        u.config()
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    done = ([json.loads(line) for line in runs_path.open() if line.strip()]
            if runs_path.is_file() else [])

    def finished(u: Unit, m: str) -> bool:
        tag = u.tag()
        return any({k: r.get(k) for k in tag} == tag and r["method"] == m for r in done)

    def wanted(u: Unit) -> list[str]:
        # The oracle labels every training row, so it is the same model for every labels
        # count (same rows, same seed): run it once per seed, at the largest count.
        return [m for m in methods if m != "oracle" or u.labels_per_class == max(labels)]

    todo = [(u, left) for u in units
            if (left := [m for m in wanted(u) if not finished(u, m)])]
    todo.sort(key=lambda t: -len(t[1]))  # the units with the oracle first: shorter tail
    n_runs, t0 = sum(len(m) for _, m in todo), time.perf_counter()
    print(f"{n_runs} runs to do in {len(todo)} units "
          f"({sum(len(wanted(u)) for u in units) - n_runs} already in {runs_path})",
          flush=True)
    new: list[dict[str, Any]] = []

    def record(res: dict[str, Any]) -> None:
        done.append(res)
        new.append(res)
        with runs_path.open("a") as f:  # one line per finished run: the resume point
            f.write(json.dumps(res) + "\n")
        print(f"--- {len(new)}/{n_runs} runs done, {time.perf_counter() - t0:.0f} s",
              flush=True)

    if args.workers > 1 and todo:
        from raysl.distributed.tasks import stream

        stream(run_unit, [(u, m, str(out.resolve()), args.threads) for u, m in todo],
               args.threads, args.workers, record)
    else:
        for u, left in todo:
            for res in run_unit(u, left, str(out), args.threads):
                record(res)
    rows = [r for r in done if r["quick"] == args.quick and r["dataset"] in datasets
            and r["labels_per_class"] in labels and r["seed"] < seeds and r["method"] in methods
            and r.get("overrides", {}) == overrides]
    md = table(share_oracle(rows, labels))
    (out / "table.md").write_text(md + "\n")
    plot(share_oracle(rows, labels), out / "accuracy_vs_labels.png")
    print("\n" + md)
    print(f"\n{len(new)} runs in {time.perf_counter() - t0:.0f} s; wrote "
          f"{out / 'table.md'}, {out / 'accuracy_vs_labels.png'}, {runs_path}")
    return 0
