"""``raysl tune``: a Ray Tune search over config keys, with shared backend fits and a report.

Ray 2.60's Train–Tune pattern: each trial is a Tune *function* trainable (the trial driver, at
0.1 CPU) that selects pseudo-labels from cached probabilities and launches one ``TorchTrainer``
for the joint model, whose per-epoch reports reach Tune through ``TuneReportCallback`` (so
ASHA can stop it early). ``Tuner(TorchTrainer)`` no longer exists.

Fits are shared: before ``Tuner.fit()`` the driver trains the baseline and fits every backend
the space names once, into ``out/shared/<key>/`` (the pipeline's own cached stages, keyed by
the data and training config that change them). Trials read those caches, so N thresholds × M
backends cost M backend fits. Trials are ranked on validation accuracy only.

Layout of ``out/``::

    search.json            the base config and space (a re-run must match it to resume)
    shared/<key>/          baseline/ and cache/proba-*.npz, one dir per distinct baseline;
                           `raysl run --config best.yaml --out` this dir replays the best trial
    trials/<trial_id>/     each trial's config.yaml, joint/, ray/ (Train run), result.json, log
    tune/                  the Tune experiment (Tuner.restore resumes it)
    trials.csv trials.md best.yaml plots/*.png report.md
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.tune

from raysl import pipeline
from raysl.backends import BACKENDS
from raysl.config import Config, apply_overrides, dump_yaml, to_dict
from raysl.data import Split
from raysl.errors import ConfigError
from raysl.io import write_json, write_text
from raysl.report import (
    Param,
    ReportInputs,
    SearchSpec,
    TrialRecord,
    best,
    load_space,
    prefit_overrides,
    write_report,
)

Log = pipeline.Log
TRIAL_CPUS = 0.1  # the trial driver only waits on its TorchTrainer; workers hold the CPUs
EXPERIMENT = "tune"


@dataclass
class TuneOutcome:
    """What :func:`tune` returns (also written to ``out``)."""

    out: Path
    records: list[TrialRecord]
    best: TrialRecord | None
    best_config: Config | None
    replay_out: Path | None  # the shared dir whose caches a replay of best.yaml reuses
    backend_fits: int  # backend fits the driver ran before the trials (0 when all cached)
    resumed: bool  # True when an earlier search in ``out`` was restored
    wall_seconds: float
    table: str
    notes: list[str] = field(default_factory=list)


def shared_dir(root: Path, cfg: Config) -> Path:
    """The pipeline output dir holding the baseline and backend caches a trial with ``cfg``
    uses. One per distinct baseline: the data config and the training config without
    ``lambda_u`` (which the baseline zeroes), exactly what the baseline stage depends on."""
    key = pipeline.cache_key(asdict(cfg.data), asdict(replace(cfg.train, lambda_u=0.0)))
    return root / "shared" / key


def _absolute_paths(cfg: Config) -> Config:
    # Tune runs trials with the trial dir as working directory: make a relative dataset path
    # absolute so trials (and best.yaml) find the same file as the driver.
    ds = Path(cfg.data.dataset).expanduser()
    if not ds.is_absolute() and ds.suffix in (".npz", ".parquet") and ds.is_file():
        cfg = apply_overrides(cfg, {"data.dataset": str(ds.resolve())})
    return cfg


def _upstream(cfg: Config, root: Path, log: Log, split: Split | None = None,
              use_ray: bool = True, **train_kwargs: Any
              ) -> tuple[Split, dict[str, Any], dict[str, Any], Path]:
    """Baseline + backend probabilities for ``cfg`` from (or into) its shared dir.
    ``use_ray``: fit a missing backend with one actor per shard (else in this process)."""
    split = split if split is not None else pipeline.check(cfg)
    sdir = shared_dir(root, cfg)
    base = pipeline.baseline(split, cfg, sdir, log, **train_kwargs)
    state = pipeline.load_state(sdir / "baseline" / "model.pt")
    pl = pipeline.pseudo_label(split, cfg, sdir, state, log, use_ray=use_ray)
    return split, base, pl, sdir


def _file_log(path: Path) -> Log:
    def log(msg: str) -> None:
        with path.open("a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    return log


def _trial(config: dict[str, Any], base: Config, root: str) -> None:
    """One trial (a Tune function trainable): select from the cached probabilities, train the
    joint model with a TorchTrainer that reports every epoch to Tune, then report the final
    model's metrics once more with ``final=True``.

    A restored trial runs this again from the top: the upstream stages are cache hits, and the
    Train run (stable name ``train-<trial_id>``) resumes from its latest checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    t0 = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_overrides(base, config)
    tdir = Path(root) / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    log = _file_log(tdir / "log.txt")
    log(f"attempt started: {config}")  # one line per attempt: restores show up here
    write_text(tdir / "config.yaml", dump_yaml(cfg))
    # Normally cache hits (the driver fitted them). When not (a range-sampled key that changes
    # the fit): the backend is fitted in this process, not by shard actors, because concurrent
    # trials each holding one of their two actors would wait on each other forever (actors are
    # not gang-scheduled); same result, as the actor==local tests show. The baseline's Train
    # run is named by trial so two trials missing the same baseline never share a run
    # directory (both write the same result, atomically).
    split, base_rec, pl, _ = _upstream(cfg, Path(root), log, use_ray=False, verbose=False,
                                       run_name=f"baseline-{trial_id}")
    # the same pseudo-labels as `raysl run` with this config: a replay of best.yaml matches
    sel, plm, _ = pipeline.choose_pseudo_labels(split, cfg, pl, base_rec["val_accuracy"])
    j = pipeline.joint(split, cfg, tdir, sel, log, callbacks=[TuneReportCallback()],
                       run_name=f"train-{trial_id}", verbose=False)
    final = {
        "final": True,
        "val_accuracy": j["val_accuracy"], "test_accuracy": j["test_accuracy"],
        "precision": plm["precision"], "coverage": plm["coverage"],
        "n_selected": plm["n_selected"], "argmax_accuracy": plm["argmax_accuracy"],
        "backend": cfg.backend.name, "threshold": cfg.select.threshold,
        "baseline_val_accuracy": base_rec["val_accuracy"],
        "baseline_test_accuracy": base_rec["test_accuracy"],
        "epochs": j["epochs"], "resumed_from_epoch": j["resumed_from_epoch"],
        "backend_cached": pl["cached"], "fit_seconds": pl["seconds"],
        "seconds": time.perf_counter() - t0,
    }
    write_json(tdir / "result.json", pipeline.json_safe(final))
    log(f"done: val {j['val_accuracy']:.4f} test {j['test_accuracy']:.4f}")
    tune.report(final)


# -- Tune objects ---------------------------------------------------------------------------

def _domain(p: Param, search: str) -> Any:
    from ray import tune

    if p.kind == "fixed":
        return p.values[0]
    if p.kind == "grid" and search == "grid":
        return tune.grid_search(list(p.values))
    if p.kind in ("grid", "choice"):  # random/optuna sample the listed values
        return tune.choice(list(p.values))
    lo, hi = p.values
    return {"uniform": tune.uniform, "loguniform": tune.loguniform,
            "randint": tune.randint}[p.kind](lo, hi)


def param_space(spec: SearchSpec) -> dict[str, Any]:
    """Tune's search space, keyed by the same dotted keys as ``--set``."""
    return {p.key: _domain(p, spec.search) for p in spec.params}


def n_trials(spec: SearchSpec) -> int:
    """How many trials the search runs."""
    return spec.n_grid * spec.num_samples if spec.search == "grid" else spec.num_samples


def _max_epochs(spec: SearchSpec, base: Config) -> int:
    for p in spec.params:
        if p.key == "train.epochs":
            return int(max(p.values) - (1 if p.kind == "randint" else 0))
    return base.train.epochs


def _auto_concurrency(base: Config) -> int:
    """As many trials as the cluster's CPUs (and GPUs) fit at once, so none waits holding its
    driver's CPU for workers that can't start."""
    import ray

    res = ray.cluster_resources()
    t = base.train
    per_trial = TRIAL_CPUS + max(t.num_workers, 1) * t.cpus_per_worker
    n = int((res.get("CPU", 1.0) + 1e-9) // per_trial)
    if t.use_gpu:
        n = min(n, int(res.get("GPU", 0.0) // max(t.num_workers, 1)))
    return max(1, n)


def _tuner(spec: SearchSpec, base: Config, root: Path, log: Log, concurrency: int,
           resume: bool) -> Any:
    from ray import tune

    # Tune's new console output prints a header and a TensorBoard hint even at verbose=0;
    # the Progress callback's lines are all this command prints.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, root=str(root)),
                                    {"cpu": TRIAL_CPUS, "gpu": 0})
    exp = root / EXPERIMENT
    if resume:
        # Finished trials are kept as they are; unfinished and errored ones run again (their
        # Train runs resume from their checkpoints).
        return tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
    from ray.tune.schedulers import ASHAScheduler

    if spec.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(sampler=TPESampler(seed=spec.seed))
        limit: int | None = concurrency  # Tune wraps the searcher in a ConcurrencyLimiter
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig(max_concurrent_trials) for a generator instance: set it here.
        search_alg = BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrency)
        limit = None
    scheduler = None
    if spec.asha is not None:
        # +1: the trial's last report (final metrics) comes after the last epoch's; ASHA stops
        # a trial that reaches max_t, which must not cut that report off.
        scheduler = ASHAScheduler(time_attr="training_iteration",
                                  max_t=_max_epochs(spec, base) + 1, **dict(spec.asha))
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode="max", search_alg=search_alg,
                                    scheduler=scheduler, num_samples=spec.num_samples,
                                    max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(root), verbose=0,
                                  callbacks=[Progress(spec.keys, n_trials(spec), log)]),
    )


class Progress(ray.tune.Callback):
    """One line per trial start and end, instead of Tune's status tables."""

    def __init__(self, keys: list[str], total: int, log: Log = print) -> None:
        # total: Tune creates grid trials lazily (max_concurrent), so len(trials) grows
        self.keys, self.total, self.log = keys, total, log

    # Tune pickles its run config (with the callbacks) into the experiment dir; the log function
    # may not pickle (print is patched by Ray), and a restored search passes its own anyway.
    def __getstate__(self) -> dict[str, Any]:
        return {"keys": self.keys, "total": self.total}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.keys, self.total, self.log = state["keys"], state.get("total", 0), print

    def _what(self, trial: Any) -> str:
        return " ".join(f"{k}={trial.config.get(k)}" for k in self.keys)

    def _count(self, trials: list[Any], trial: Any) -> str:
        done = sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials)
        return f"({done}/{max(self.total, len(trials))})"

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.log(f"[tune] {trial.trial_id} started: {self._what(trial)}")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        r = trial.last_result or {}
        if r.get("final"):
            self.log(f"[tune] {trial.trial_id} done {self._count(trials, trial)}: "
                     f"val {100 * r['val_accuracy']:.1f}% test {100 * r['test_accuracy']:.1f}% "
                     f"coverage {100 * r['coverage']:.1f}% in {r['seconds']:.0f}s")
        else:
            self.log(f"[tune] {trial.trial_id} stopped early {self._count(trials, trial)} "
                     f"after {r.get('training_iteration', 0)} epoch(s): val "
                     f"{100 * r.get('val_accuracy', math.nan):.1f}%")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        self.log(f"[tune] {trial.trial_id} failed {self._count(trials, trial)}: see "
                 f"{trial.path}/error.txt")


# -- results --------------------------------------------------------------------------------

def _short_error(err: BaseException | None) -> str:
    """The line of a (remote) traceback that says what went wrong: its last one, uncoloured."""
    if err is None:
        return ""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("...", "^", "File "))]
    return lines[-1] if lines else type(err).__name__


def _records(results: Any, keys: list[str]) -> list[TrialRecord]:
    recs = []
    for r in results:
        m = dict(r.metrics or {})
        tid = str(m.get("trial_id") or Path(r.path).name)
        if r.error is not None:
            status = "error"
        elif m.get("final"):
            status = "done"
        elif m:
            status = "stopped early"
        else:
            status = "not run"
        recs.append(TrialRecord(tid, {k: r.config.get(k) for k in keys}, status, m,
                                _short_error(r.error)))
    return sorted(recs, key=lambda t: t.trial_id)


def _check_same_search(path: Path, spec: SearchSpec, base: Config) -> bool:
    """True when ``path`` records this very search (so it can be resumed); raise when it
    records another one; False when there is none yet."""
    # ray.* says where to run, not what: it may differ between the run and its resume.
    want = {"space": spec.raw, "config": {k: v for k, v in to_dict(base).items() if k != "ray"}}
    if path.is_file():
        have = json.loads(path.read_text())
        if have != json.loads(json.dumps(want, default=str)):
            raise ConfigError(f"{path.parent} holds a different search (config or space "
                              "differs); use a new --out, or delete it to start over")
        return True
    write_json(path, json.loads(json.dumps(want, default=str)))
    return False


def tune(cfg: Config, space_path: str | Path | None, out: str | Path,
         log: Log = print) -> TuneOutcome:
    """Run (or resume) the search in ``out`` and write the report; see the module doc."""
    t0 = time.perf_counter()
    root = Path(out).resolve()
    base = _absolute_paths(cfg)
    spec = load_space(space_path, base, tuple(BACKENDS))
    if spec.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("space file: search=optuna needs the optuna package "
                              "(pip install optuna)") from None
    # Everything that can fail on bad input, before Ray starts: every upstream setting's data
    # split and backend name.
    prefit = [apply_overrides(base, ov) for ov in prefit_overrides(spec)]
    splits: dict[str, Split] = {}
    for c in prefit:
        k = json.dumps(asdict(c.data), sort_keys=True)
        splits[k] = splits[k] if k in splits else pipeline.check(c)
    root.mkdir(parents=True, exist_ok=True)
    same = _check_same_search(root / "search.json", spec, base)

    from raysl.distributed.session import ensure_ray

    started = ensure_ray(base.ray)
    try:
        exp = root / EXPERIMENT
        # A driver killed while Tune wrote tuner.pkl leaves it empty: nothing to resume then.
        resume = (same and ray.tune.Tuner.can_restore(str(exp))
                  and (exp / "tuner.pkl").stat().st_size > 0)
        log(f"[tune] {'resuming the search in' if resume else 'search:'} {root}: "
            f"{spec.search} over {', '.join(spec.keys)}"
            + f" ({n_trials(spec)} trials)")
        # Fit every baseline and backend the trials will read, once, before they start.
        fits = 0
        for c in prefit:
            split = splits[json.dumps(asdict(c.data), sort_keys=True)]
            _, _, pl, _ = _upstream(c, root, log, split=split, verbose=False)
            fits += not pl["cached"]
        log(f"[tune] {len(prefit)} upstream setting(s) ready ({fits} backend fit(s) now, "
            f"{len(prefit) - fits} cached)")
        concurrency = spec.max_concurrent_trials or _auto_concurrency(base)
        log(f"[tune] up to {concurrency} trial(s) at once, {TRIAL_CPUS} CPU each + "
            f"{max(base.train.num_workers, 1)} worker(s) × {base.train.cpus_per_worker} CPU"
            + (" + 1 GPU" if base.train.use_gpu else ""))
        results = _tuner(spec, base, root, log, concurrency, resume).fit()
        records = _records(results, spec.keys)
        n_val = n_test = None
        if splits:
            s0 = next(iter(splits.values()))
            n_val, n_test = len(s0.y_val), len(s0.y_test)
    finally:
        if started:
            ray.shutdown()

    top = best(records, spec.metric)
    best_cfg = apply_overrides(base, top.config) if top is not None else None
    replay = shared_dir(root, best_cfg) if best_cfg is not None else None
    notes = []
    if any(p.kind in ("uniform", "loguniform", "randint") and not p.key.startswith("select.")
           for p in spec.params):
        notes.append("keys drawn from ranges that change the baseline or backend fit are "
                     "fitted by the trials that draw them (and cached)")
    wall = time.perf_counter() - t0
    table = write_report(root, records, ReportInputs(
        spec, base, best_cfg, str(replay) if replay else "", wall, n_val, n_test, notes))
    log("\n" + table)
    if top is not None:
        log(f"\n[tune] best by {spec.metric}: {top.trial_id}; config {root / 'best.yaml'}; "
            f"report {root / 'report.md'}; wall time {wall:.0f}s")
    else:
        log(f"\n[tune] no trial completed; report {root / 'report.md'}")
    return TuneOutcome(root, records, top, best_cfg, replay, fits, resume, wall, table, notes)
