"""``raysl bench scale``: how a run's cost grows with the data (issue 13, item 4).

For each N in ``--rows`` it writes a Parquet dataset of N rows (a folder of files of at most
70,000 rows, read by :mod:`raysl.readers` as a user's table would be): Fashion-MNIST's 70,000
images (training and test, from Debian's ``dataset-fashion-mnist`` idx files) repeated to N
rows as 784 ``uint8`` pixel columns, or, without them (or with ``--source synthetic``), a
Gaussian mixture of 10 classes in ``--dim`` float32 columns. ``--labeled`` of the rows keep
their label (``y``), the others are unlabeled (``y = -1``). The files are kept in
``OUT/data/`` and re-used.

Then, for each N, a fresh Python process (so its peak RSS is that N's alone) starts its own Ray
(``--nodes 2``: a two-node ``ray.cluster_utils.Cluster``, 1 CPU and ``--node-store-gb`` of
object store each) and runs the pipeline's stages as ``raysl run`` does, timed one by one:

- ``read + split``: :func:`raysl.pipeline.check` (Ray Data read into the object store, the
  split from the labels, the labeled and validation rows to the driver, the pool and the test
  set routed to their shards in the store: :mod:`raysl.distributed.pool`; standardization
  from the shards' moments);
- ``pseudo-label (gmm) + selection``: :func:`raysl.pipeline.pseudo_label` with the GMM backend
  on Ray actors (``--gmm-rounds`` EM rounds, tolerance 0: the same work per row at every N),
  then :func:`raysl.pipeline.selection` at ``select.threshold=0.5``, so that most of the pool
  is kept and the joint stage's ranks read it (each its share, through Ray Data);
- ``joint training``: :func:`raysl.pipeline.joint` on Ray Train, one epoch (one pass over the
  unlabeled pool; ``train.min_steps=0``), so rows/s is pool rows per second; ``training loop``
  is the same epoch without Ray Train's start-up (the workers' own clock).

Per stage: wall time, rows/s, the driver's peak RSS and Ray's object-store peak, both sampled
every 50 ms in a thread (the object store's use is ``ray.cluster_resources()`` minus
``ray.available_resources()`` for ``object_store_memory``: Ray 2.60 counts the bytes held
there); the whole process's peak RSS comes from ``getrusage``. Then each shard actor's
memory after labelling and each Ray Train rank's at the end of its loop, their rows still
held (``backend.shard_storage``, ``train.share_storage``: on the heap, anonymous memory, or in
a file-backed array, file pages the OS can drop). Last,
the issue's targets as ratios of the largest N to the smallest: driver peak RSS ≤ 1.2×,
pseudo-labelling rows/s ≥ 0.8×.

    raysl bench scale [--rows 70000,700000] [--labeled 0.01] [--nodes 1|2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysl.config import Config, DataConfig, apply_overrides, parse_set
from raysl.errors import ConfigError, DataError

FASHION_ROWS = 70_000  # Fashion-MNIST: 60,000 training + 10,000 test images
FILE_ROWS = 70_000  # rows per Parquet file
STAGES = ("read + split", "pseudo-label (gmm) + selection", "joint training", "training loop")
RSS_TARGET = 1.2  # driver peak RSS at the largest N / at the smallest, at most
RATE_TARGET = 0.8  # pseudo-labelling rows/s at the largest N / at the smallest, at least
GB = 1e9


# -- the data -------------------------------------------------------------------------------

def fashion_pixels() -> tuple[np.ndarray, np.ndarray] | None:
    """Fashion-MNIST's 70,000 images as ``uint8 (70000, 784)`` and labels ``(70000,)``, from
    the idx files raysl finds (Debian's ``dataset-fashion-mnist``, ``data.root``); None when
    there are none."""
    from raysl.data import DATASETS

    try:
        ds = DATASETS["fashion_mnist"](DataConfig())
    except DataError:
        return None
    assert ds.x_test is not None and ds.y_test is not None
    x = np.concatenate([ds.x, ds.x_test]).reshape(-1, 28 * 28)
    return np.rint(x * 255).astype(np.uint8), np.concatenate([ds.y, ds.y_test])


@dataclass(frozen=True)
class Source:
    """Where the rows come from: ``name`` "fashion" or "synthetic", and how the table says it."""

    name: str
    dim: int

    def describe(self, labeled: float) -> str:
        what = ("Fashion-MNIST (Debian's dataset-fashion-mnist: 70,000 images) repeated, 784 "
                "uint8 pixel columns" if self.name == "fashion" else
                f"synthetic Gaussian mixture (10 classes), {self.dim} float32 columns")
        return f"{what}; {labeled:.1%} of rows labeled"


def choose_source(name: str, dim: int) -> Source:
    """``auto``: Fashion-MNIST when its idx files are installed, else synthetic."""
    if name == "synthetic":
        return Source("synthetic", dim)
    from raysl.data import _find_idx

    found = _find_idx("fashion_mnist", Path(DataConfig().root).expanduser()) is not None
    if name == "fashion" and not found:
        raise DataError("--source fashion: no Fashion-MNIST idx files (apt-get install "
                        "dataset-fashion-mnist)")
    return Source("fashion", 784) if found else Source("synthetic", dim)


def _chunk(src: Source, start: int, n: int, rng: np.random.Generator,
           base: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start .. start + n`` of the dataset: features and true labels."""
    if src.name == "fashion":
        assert base is not None
        idx = (start + np.arange(n)) % len(base[1])
        return base[0][idx], base[1][idx]
    means = np.random.default_rng(12345).normal(0.0, 1.0, (10, src.dim)).astype(np.float32)
    y = rng.integers(0, 10, n)
    x = means[y] * 1.5 + rng.standard_normal((n, src.dim), dtype=np.float32)
    return x, y


def write_dataset(folder: Path, src: Source, n: int, labeled: float, seed: int = 0) -> Path:
    """``n`` rows as ``folder/part-*.parquet`` (columns ``f0..``, ``y``; ``y = -1`` for the
    unlabeled rows), or the folder as it is when a previous call wrote the same rows (its
    ``_bench.json``, which the readers skip, says what it holds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"rows": n, "source": src.name, "dim": src.dim, "labeled": labeled, "seed": seed}
    marker = folder / "_bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.parquet"):
        old.unlink()
    marker.unlink(missing_ok=True)
    base = fashion_pixels() if src.name == "fashion" else None
    rng = np.random.default_rng(seed)
    for i, start in enumerate(range(0, n, FILE_ROWS)):
        k = min(FILE_ROWS, n - start)
        x, y = _chunk(src, start, k, rng, base)
        y = np.where(rng.random(k) < labeled, y, -1).astype(np.int64)
        cols = {f"f{j}": x[:, j] for j in range(x.shape[1])}
        pq.write_table(pa.table({**cols, "y": y}), folder / f"part-{i:05d}.parquet")
    marker.write_text(json.dumps(meta))
    return folder


# -- one N, in a process of its own ---------------------------------------------------------

def driver_rss() -> int:
    """This process's resident set size in bytes (Linux ``/proc``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def object_store_used() -> int:
    """Bytes in Ray's object store over the cluster: ``object_store_memory`` in
    ``ray.cluster_resources()`` less ``ray.available_resources()`` (a 100 MB ``ray.put``
    moves it by 100 MB in Ray 2.60)."""
    import ray

    total = ray.cluster_resources().get("object_store_memory", 0.0)
    free = ray.available_resources().get("object_store_memory", 0.0)
    return int(max(total - free, 0.0))


class Monitor:
    """Samples the driver's RSS and the object store's use every ``interval`` seconds in a
    thread, and keeps each stage's wall time and peaks (:meth:`stage`)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.stages: list[dict[str, Any]] = []
        self._rss = self._store = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="raysl-bench-monitor",
                                        daemon=True)

    def sample(self) -> None:
        rss = driver_rss()
        try:
            store = object_store_used()
        except Exception:  # Ray between states: this sample has no store figure
            store = 0
        with self._lock:
            self._rss, self._store = max(self._rss, rss), max(self._store, store)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def stage(self, name: str, rows: int) -> Iterator[dict[str, Any]]:
        """Time the block and record its peaks; the caller may add fields to the record."""
        with self._lock:
            self._rss = self._store = 0
        self.sample()
        record: dict[str, Any] = {"stage": name, "rows": rows}
        t0 = time.perf_counter()
        yield record
        record["seconds"] = time.perf_counter() - t0
        self.sample()
        with self._lock:
            record.update(rss_peak=self._rss, store_peak=self._store)
        self.stages.append(record)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one N (``spec``: ``rows``, ``nodes``, ``out``, ``overrides``) in this process, which
    must not be in a Ray session yet; returns its stage records and peaks."""
    import shutil
    import warnings

    import ray

    from raysl import pipeline
    from raysl.distributed.session import runtime_env, start_local

    cfg = apply_overrides(Config(), spec["overrides"])
    # a fixed number of EM rounds (tolerance 0) is the point here, not a converged fit
    warnings.filterwarnings("ignore", message="GMM EM stopped at backend.gmm.max_iter")
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)  # no cached stage: every N is measured afresh
    out.mkdir(parents=True)
    cluster = None
    if spec["nodes"] == 2:
        from ray.cluster_utils import Cluster

        # cluster_utils' nodes get a 150 MB object store by default: everything would spill
        node = {"num_cpus": 1, "object_store_memory": int(spec["node_store_gb"] * GB)}
        cluster = Cluster(initialize_head=True, head_node_args=node)
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING",
                 runtime_env=runtime_env(address=cluster.address))
    else:
        start_local(cfg.ray.num_cpus or None, logging_level="WARNING")
    result: dict[str, Any] = {"rows": spec["rows"], "nodes": len(
        [n for n in ray.nodes() if n["Alive"]])}
    try:
        with Monitor() as mon:
            with mon.stage(STAGES[0], spec["rows"]):
                split = pipeline.check(cfg)  # the readers use this session
            n_u = len(split.x_u)
            with mon.stage(STAGES[1], n_u) as rec:
                pl = pipeline.pseudo_label(split, cfg, out, {}, use_ray=True)
                sel, plm = pipeline.selection(split, cfg, pl)
                rec.update(rounds=pl["rounds"], selected=int(plm["n_selected"]))
                result["actors"] = pl.get("actors", [])
                del pl  # as `raysl run` does: the labels are not held through the job
            with mon.stage(STAGES[2], n_u * cfg.train.epochs) as rec:
                j = pipeline.joint(split, cfg, out, sel, verbose=False)
                rec["steps"] = int(sum(h.get("steps", 0) for h in j["history"]))
            result["ranks"] = j.get("rank_rows", [])
            loop_s = float(sum(h["train_seconds"] for h in j["history"]))
            mon.stages.append({"stage": STAGES[3], "rows": n_u * cfg.train.epochs,
                               "seconds": loop_s, "rss_peak": None, "store_peak": None})
        result.update(stages=mon.stages, n_labeled=len(split.y_l), n_unlabeled=n_u,
                      workers=cfg.train.num_workers,
                      peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return result


def _child(argv: list[str]) -> int:
    """``python -m raysl.bench.scale SPEC.json RESULT.json``: :func:`measure` in this fresh
    process, its result written as JSON."""
    import logging

    log = logging.getLogger("raysl")  # progress to this process's stderr (the N's log file)
    log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.INFO)
    log.propagate = False
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(measure(spec)))
    return 0


# -- the parent: data, one process per N, the table -----------------------------------------

def _rows_list(text: str) -> list[int]:
    try:
        rows = sorted({int(v.replace("_", "")) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--rows {text!r}: expected comma-separated row counts, e.g. "
                          "70000,700000") from None
    if not rows or rows[0] < 1000:
        raise ConfigError(f"--rows {text!r}: every count must be at least 1000")
    return rows


def run_one(spec: dict[str, Any], folder: Path, timeout: float) -> dict[str, Any]:
    """:func:`measure` in a child process (its own session: on timeout its whole process group,
    Ray's processes included, is stopped); its output goes to ``folder/rows-N.log``."""
    n = spec["rows"]
    spec_path, result_path = folder / f"rows-{n}.spec.json", folder / f"rows-{n}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    log_path = folder / f"rows-{n}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "raysl.bench.scale", str(spec_path),
                                 str(result_path)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise RuntimeError(f"rows {n}: no result after {timeout:.0f} s (log: {log_path})"
                               ) from None
    if rc != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise RuntimeError(f"rows {n}: the run failed (exit {rc}; log: {log_path}):\n{tail}")
    return json.loads(result_path.read_text())


def _gb(x: float | None) -> str:
    return "" if x is None else f"{x / GB:.2f}"


def _rate(rec: dict[str, Any]) -> float:
    return rec["rows"] / rec["seconds"] if rec["seconds"] > 0 else float("nan")


def _stage(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in result["stages"] if s["stage"] == name)


def table(results: list[dict[str, Any]]) -> str:
    """The per-stage table (markdown), one block of rows per N, then the targets."""
    lines = ["| rows | stage | wall s | rows/s | driver peak RSS GB | object store peak GB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        n = f"{r['rows']:,}"
        for s in r["stages"]:
            name = s["stage"]
            if name == STAGES[1]:
                name += f" ({s['rounds']} rounds incl. the PCA's, {s['selected']:,} kept)"
            elif name == STAGES[2]:
                name += (f" ({s['steps']:,} steps × {max(r['workers'], 1)} worker(s): one "
                         "pass)")
            lines.append(f"| {n} | {name} | {s['seconds']:.1f} | {_rate(s):,.0f} "
                         f"| {_gb(s['rss_peak'])} | {_gb(s['store_peak'])} |")
        total = sum(s["seconds"] for s in r["stages"] if s["stage"] != STAGES[3])
        store = max(s["store_peak"] or 0 for s in r["stages"])
        lines.append(f"| {n} | whole run (peak RSS: getrusage) | {total:.1f} | "
                     f"{r['rows'] / total:,.0f} | {_gb(r['peak_rss'])} | {_gb(store)} |")
    # "read s": the time a Train rank took to read its rows through Ray Data before its loop
    lines += ["", "| rows | worker | its rows | kept in | read s | anonymous RSS GB | "
              "file RSS GB | peak RSS GB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        workers = [(f"shard actor {k}", f"{a['rows']:,}", "disk" if a["on_disk"] else "memory",
                    "", a.get("memory", {})) for k, a in enumerate(r.get("actors", []))]
        workers += [(f"Train rank {k}", f"{w.get('x_p', 0):,} kept / {w.get('x_u', 0):,} pool",
                     "disk: " + ", ".join(w["on_disk"]) if w.get("on_disk") else "memory",
                     f"{sum(w.get('read_seconds', {}).values()):.1f}", w.get("memory", {}))
                    for k, w in enumerate(r.get("ranks", []))]
        lines += [f"| {r['rows']:,} | {name} | {rows} | {where} | {read} | "
                  f"{_gb(mem.get('RssAnon'))} | {_gb(mem.get('RssFile'))} | "
                  f"{_gb(mem.get('VmHWM'))} |" for name, rows, where, read, mem in workers]
    lines += ["", "| target (largest N / smallest N) | measured | verdict |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {verdict} |" for name, value, verdict in targets(results)]
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The issue's targets as (what, measured ratio, PASS / FAIL / n/a) rows."""
    small, large = results[0], results[-1]
    which = f"{large['rows']:,} / {small['rows']:,}"
    if len(results) < 2:
        return [("driver peak RSS, pseudo-labelling rows/s", "one N only", "n/a")]
    rss = large["peak_rss"] / small["peak_rss"]
    rate = _rate(_stage(large, STAGES[1])) / _rate(_stage(small, STAGES[1]))
    loop = _rate(_stage(large, STAGES[3])) / _rate(_stage(small, STAGES[3]))
    ranks = []
    for what, key in (("shard actor", "actors"), ("Train rank", "ranks")):
        anon = [max((w.get("memory", {}).get("RssAnon", 0) for w in r.get(key, [])), default=0)
                for r in (small, large)]
        if all(anon):
            ranks.append((f"largest {what} anonymous RSS at {which} (no target here)",
                          f"{anon[1] / anon[0]:.2f}", "-"))
    return [
        (f"driver peak RSS at {which} ≤ {RSS_TARGET}", f"{rss:.2f}",
         "PASS" if rss <= RSS_TARGET else "FAIL"),
        (f"pseudo-labelling rows/s at {which} ≥ {RATE_TARGET}", f"{rate:.2f}",
         "PASS" if rate >= RATE_TARGET else "FAIL"),
        (f"training loop rows/s at {which} (no target here)", f"{loop:.2f}", "-"),
        *ranks,
    ]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="raysl bench scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="70000,700000", help="comma-separated row counts")
    ap.add_argument("--labeled", type=float, default=0.01, help="share of rows with a label")
    ap.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                    help="2: a two-node ray.cluster_utils.Cluster (1 CPU each)")
    ap.add_argument("--node-store-gb", type=float, default=3.0,
                    help="--nodes 2: each node's object store (GB)")
    ap.add_argument("--source", choices=("auto", "fashion", "synthetic"), default="auto",
                    help="auto: Fashion-MNIST if its idx files are installed, else synthetic")
    ap.add_argument("--dim", type=int, default=784, help="synthetic rows: feature columns")
    ap.add_argument("--gmm-rounds", type=int, default=10, help="EM rounds (tolerance 0)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per row count")
    ap.add_argument("--out", default="runs/bench-scale")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. train.num_workers=1)")
    args = ap.parse_args(argv)
    rows = _rows_list(args.rows)
    if not 0.0 < args.labeled < 1.0:
        raise ConfigError(f"--labeled {args.labeled}: must be in (0, 1)")
    if args.dim < 1 or args.gmm_rounds < 1:
        raise ConfigError("--dim and --gmm-rounds must be at least 1")
    out = Path(args.out).resolve()
    overrides = {"backend.name": "gmm", "backend.gmm.max_iter": args.gmm_rounds,
                 "backend.gmm.tol": 0.0, "select.threshold": 0.5,
                 "train.epochs": 1, "train.min_steps": 0,
                 **parse_set(args.set)}
    apply_overrides(Config(), {**overrides, "data.dataset": "digits"})  # bad keys fail here
    src = choose_source(args.source, args.dim)
    runs = out / ("runs" if args.nodes == 1 else "runs-2nodes")
    runs.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"data: {src.describe(args.labeled)}; {args.nodes} node(s); load average at start "
          f"{load[0]:.1f}", flush=True)
    results = []
    for n in rows:
        folder = write_dataset(out / "data" / f"{src.name}-{src.dim}-{n}-{args.labeled:g}",
                               src, n, args.labeled)
        print(f"rows {n:,}: data in {folder}; running (log: {runs}/rows-{n}.log)", flush=True)
        spec = {"rows": n, "nodes": args.nodes, "node_store_gb": args.node_store_gb,
                "out": str(runs / f"rows-{n}"),
                "overrides": {**overrides, "data.dataset": str(folder)}}
        results.append(run_one(spec, runs, args.timeout))
    text = table(results)
    end = os.getloadavg()
    note = (f"\ndata: {src.describe(args.labeled)}; {args.nodes} node(s), "
            f"{results[-1]['nodes']} alive in the last run; load average {load[0]:.1f} at "
            f"start, {end[0]:.1f} at the end")
    print("\n" + text + note)
    (runs / "results.json").write_text(json.dumps(results, indent=1))
    (runs / "table.md").write_text(text + "\n" + note + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
