"""``raysl tune``: a Ray Tune search over config keys, with shared fits and a report.

Ray 2.60's Train–Tune pattern: each trial is a Tune *function* trainable (the trial driver, at
0.1 CPU) that selects pseudo-labels from cached probabilities and launches one ``TorchTrainer``
for the joint model, whose per-epoch reports reach Tune through ``TuneReportCallback`` (so
ASHA can stop it early). ``Tuner(TorchTrainer)`` no longer exists.

Fits are shared, by the stage table (:mod:`raysl.stages`): before ``Tuner.fit()`` the driver
trains each distinct baseline and fits each distinct backend the listed values of the space
lead to (:func:`raysl.tuning.space.prefit_overrides`), once. A baseline lives in
``out/shared/<key>/``, keyed by what the baseline stage depends on; every backend's
probabilities live in one cache, ``out/shared/cache/``, keyed by what the backend stage depends
on (the baseline's weights too, for ``self``). So N thresholds × M backends cost M backend
fits, and a grid over ``train.lr`` trains one baseline per rate but fits gmm once. Trials read
those caches. Trials are ranked on validation accuracy only.

Layout of ``out/``::

    search.json            the base config and space (a re-run must match it to resume; the
                           resource keys, raysl.stages.RESOURCE_KEYS, may differ)
    shared/cache/          labels-<backend>-<key>/: every backend fit of the search
    shared/<key>/          baseline/, and cache/ with hard links (or copies) of the backend
                           fits used with it: `raysl run --config best.yaml --out` this dir
                           replays the best trial from the same fits
    trials/<trial_id>/     each trial's config.yaml, joint/, ray/ (Train run), result.json,
                           log.txt (the trial's raysl log records)
    tune/                  the Tune experiment (Tuner.restore resumes it)
    trials.csv trials.md best.yaml plots/*.png report.md

Progress goes to ``logging.getLogger("raysl")``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.tune

from raysl import pipeline, stages
from raysl.backends import BACKENDS
from raysl.config import Config, apply_overrides, dump_yaml, to_dict
from raysl.data import Remote, Split
from raysl.errors import ConfigError
from raysl.io import sha256_file, write_json, write_text, write_with
from raysl.tuning.report import ReportInputs, TrialRecord, best, write_report
from raysl.tuning.space import (
    Param,
    SearchSpec,
    changes_a_fit,
    load_space,
    n_trials,
    prefit_overrides,
)

logger = logging.getLogger("raysl")

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


# -- shared fits ----------------------------------------------------------------------------

def shared_cache(root: Path) -> Path:
    """The one directory holding every backend fit (probabilities) of the search in ``root``."""
    return root / "shared" / "cache"


def shared_dir(root: Path, cfg: Config) -> Path:
    """The pipeline output dir holding the baseline a trial with ``cfg`` uses: one per distinct
    baseline, keyed by exactly what the baseline stage depends on
    (:func:`raysl.stages.config_part`; the data split's content is in the pipeline's own key).
    Its ``cache/`` links the backend fits used with it, for a replay of the trial."""
    return root / "shared" / stages.cache_key("baseline", stages.config_part("baseline", cfg))


def _link_into(src: Path, dst_dir: Path) -> None:
    """``dst_dir/src.name``: a hard link to ``src``, or a copy where links are not possible."""
    dst = dst_dir / src.name
    if dst.is_file():
        return
    if not src.is_file():
        logger.warning("[tune] %s not found: a replay in %s will fit its backend again",
                       src, dst_dir.parent)
        return
    dst_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:  # a concurrent trial linked it first
        pass
    except OSError:  # no hard links here (another filesystem, some network filesystems)
        write_with(dst, lambda p: shutil.copyfile(src, p))


def _upstream(cfg: Config, root: Path, split: Split | None = None, use_ray: bool = True,
              **train_kwargs: Any) -> tuple[Split, dict[str, Any], dict[str, Any], Path]:
    """Baseline (in its shared dir) + backend probabilities (in the shared cache) for ``cfg``,
    from the caches or fitted into them. ``use_ray``: fit a missing backend with one actor per
    shard (else in this process). ``train_kwargs`` go to :func:`raysl.pipeline.baseline`."""
    split = split if split is not None else pipeline.check(cfg)
    sdir, cache = shared_dir(root, cfg), shared_cache(root)
    base = pipeline.baseline(split, cfg, sdir, **train_kwargs)
    state = pipeline.load_state(sdir / "baseline" / "model.pt")
    pl = pipeline.pseudo_label(split, cfg, sdir, state, use_ray=use_ray, cache_dir=cache)
    for rec in pl.get("ranked", [pl]):  # every candidate of backend.name=auto
        # the file name pipeline.pseudo_label gives its cache
        fit = pipeline.cache_path(cache, rec["backend"], rec["key"])
        # meta.npz last: with it, the folder reads as a whole cache
        for f in sorted(fit.glob("*.npz"), key=lambda f: (f.name == "meta.npz", f.name)):
            _link_into(f, sdir / "cache" / fit.name)
    return split, base, pl, sdir


def _absolute_paths(cfg: Config) -> Config:
    # Tune runs trials with the trial dir as working directory: make a relative dataset path
    # absolute so trials (and best.yaml) find the same file as the driver.
    ds = Path(cfg.data.dataset).expanduser()
    if not ds.is_absolute() and ds.suffix in (".npz", ".parquet") and ds.is_file():
        cfg = apply_overrides(cfg, {"data.dataset": str(ds.resolve())})
    return cfg


# -- the trial ------------------------------------------------------------------------------

@contextmanager
def trial_log(path: Path) -> Iterator[None]:
    """Copy the ``raysl`` logger's records (INFO and up) into ``path`` while the block runs;
    the handler is removed and the logger's level restored after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.setLevel(logging.INFO)
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)


def _data_key(cfg: Config) -> str:
    """What makes two configs' splits the same: their ``data.*`` settings."""
    return json.dumps(asdict(cfg.data), sort_keys=True)


def _trial(config: dict[str, Any], base: Config, root: str,
           splits: Mapping[str, Split] | None = None) -> None:
    """One trial (a Tune function trainable): select from the cached probabilities, train the
    joint model with a TorchTrainer that reports every epoch to Tune, then report the final
    model's metrics once more with ``final=True``. The trial's raysl log records go to
    ``trials/<trial_id>/log.txt``. ``splits``: the driver's splits by :func:`_data_key` (a
    user's files: pool and test set in the object store); a trial whose data settings are not
    among them reads its data itself.

    A restored trial runs this again from the top: the upstream stages are cache hits, and the
    Train run (stable name ``train-<trial_id>``) resumes from its latest checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    t0 = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_overrides(base, config)
    if cfg.ray.enabled and cfg.train.num_workers == 0:
        # Ray Train's local mode refuses to run inside a Tune function (its get_context,
        # report and get_checkpoint raise DeprecationWarning there, ray-project/ray#49454):
        # train in this trial's process instead (same loop; no per-epoch reports for ASHA)
        cfg = replace(cfg, ray=replace(cfg.ray, enabled=False))
    tdir = Path(root) / "trials" / trial_id
    with trial_log(tdir / "log.txt"):
        logger.info("attempt started: %s", config)  # one line per attempt: restores show
        write_text(tdir / "config.yaml", dump_yaml(cfg))
        # Normally cache hits (the driver fitted them). When not (a range-sampled key that
        # changes the fit): the backend is fitted in this process, not by shard actors,
        # because concurrent trials each holding one of their two actors would wait on each
        # other forever (actors are not gang-scheduled); same result, as the actor==local
        # tests show. The baseline's Train run is named by trial so two trials missing the
        # same baseline never share a run directory (both write the same result, atomically).
        split, base_rec, pl, _ = _upstream(cfg, Path(root), (splits or {}).get(_data_key(cfg)),
                                           use_ray=False, verbose=False,
                                           run_name=f"baseline-{trial_id}")
        # the same pseudo-labels as `raysl run` with this config: a replay of best.yaml matches
        sel, plm, _ = pipeline.choose_pseudo_labels(split, cfg, pl, base_rec["val_accuracy"])
        j = pipeline.joint(split, cfg, tdir, sel, callbacks=[TuneReportCallback()],
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
            "pool": "object store" if isinstance(split.x_u, Remote) else "trial",
            "seconds": time.perf_counter() - t0,
        }
        write_json(tdir / "result.json", pipeline.json_safe(final))
        logger.info("done: val %.4f test %.4f", j["val_accuracy"], j["test_accuracy"])
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


def _max_epochs(spec: SearchSpec, base: Config) -> int:
    for p in spec.params:
        if p.key == "train.epochs":
            return int(max(p.values) - (1 if p.kind == "randint" else 0))
    return base.train.epochs


def _auto_concurrency(base: Config) -> int:
    """As many trials as the cluster's CPUs (and GPUs) fit at once, so none waits holding its
    driver's CPU for workers that can't start."""
    res = ray.cluster_resources()
    t = base.train
    per_trial = TRIAL_CPUS + max(t.num_workers, 1) * t.cpus_per_worker
    n = int((res.get("CPU", 1.0) + 1e-9) // per_trial)
    if t.use_gpu:
        n = min(n, int(res.get("GPU", 0.0) // max(t.num_workers, 1)))
    return max(1, n)


AIR_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"


@contextmanager
def quiet_tune_console() -> Iterator[None]:
    """Tune's console output off for the block (the Progress callback's lines are what the
    search logs), the caller's environment restored after.

    Ray 2.60's new console output (on unless ``RAY_AIR_NEW_OUTPUT=0``) prints a header table,
    the experiment path and a TensorBoard hint from ``experiment_started`` whatever
    ``RunConfig(verbose=0)`` says (ray/tune/experimental/output.py): no public setting turns
    that off, only the legacy output, which is silent at verbose=0. Tune reads the variable in
    ``Tuner.fit()`` (ray/tune/tune.py, ``get_air_verbosity``), so it is set for that call only,
    and left alone when the user set it."""
    before = os.environ.get(AIR_NEW_OUTPUT)
    if before is None:
        os.environ[AIR_NEW_OUTPUT] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(AIR_NEW_OUTPUT, None)


def _tuner(spec: SearchSpec, base: Config, root: Path, concurrency: int, resume: bool,
           splits: Mapping[str, Split]) -> Any:
    from ray import tune

    # the splits go into the object store once (their pool's rows, left there by a reader,
    # are not copied: only their references travel)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, root=str(root), splits=dict(splits)),
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
                                  callbacks=[Progress(spec.keys, n_trials(spec))]),
    )


class Progress(ray.tune.Callback):
    """One log line per trial start and end, instead of Tune's status tables. (Tune pickles it
    into the experiment dir with the run config: keep it plain data.)"""

    def __init__(self, keys: list[str], total: int) -> None:
        # total: Tune creates grid trials lazily (max_concurrent), so len(trials) grows
        self.keys, self.total = keys, total

    def _what(self, trial: Any) -> str:
        return " ".join(f"{k}={trial.config.get(k)}" for k in self.keys)

    def _count(self, trials: list[Any], trial: Any) -> str:
        done = sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials)
        return f"({done}/{max(self.total, len(trials))})"

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        logger.info("[tune] %s started: %s", trial.trial_id, self._what(trial))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        r = trial.last_result or {}
        if r.get("final"):
            logger.info("[tune] %s done %s: val %.1f%% test %.1f%% coverage %.1f%% in %.0fs",
                        trial.trial_id, self._count(trials, trial), 100 * r["val_accuracy"],
                        100 * r["test_accuracy"], 100 * r["coverage"], r["seconds"])
        else:
            logger.info("[tune] %s stopped early %s after %s epoch(s): val %.1f%%",
                        trial.trial_id, self._count(trials, trial),
                        r.get("training_iteration", 0), 100 * r.get("val_accuracy", math.nan))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        logger.warning("[tune] %s failed %s: see %s/error.txt", trial.trial_id,
                       self._count(trials, trial), trial.path)


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


def _search_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config, nested (as ``to_dict`` gives) or dotted, as ``{dotted key: value}`` without
    the resource keys: what a search computes, not where or how fast."""
    flat: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_search_config(v, key + "."))
        elif not stages.is_resource_key(key):
            flat[key] = v
    return flat


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


OWNER_FILE = "tuner.sha256"  # the checksum of the tuner.pkl this search wrote


def _check_own_tuner(root: Path) -> None:
    """Tune's restore unpickles ``tune/tuner.pkl`` (code can run): only restore one this raysl
    search wrote, as its recorded checksum proves."""
    pkl, owner = root / EXPERIMENT / "tuner.pkl", root / OWNER_FILE
    if not owner.is_file() or owner.read_text().strip() != sha256_file(pkl):
        raise ConfigError(f"--out {str(root)!r}: {pkl} was not written by a raysl search in "
                          f"this directory (no matching {OWNER_FILE}); refusing to restore "
                          "(unpickle) it. Use a new --out")


def _check_same_search(path: Path, spec: SearchSpec, base: Config) -> bool:
    """True when ``path`` records this very search (so it can be resumed); raise when it
    records another one; False when there is none yet. The resource keys
    (:data:`raysl.stages.RESOURCE_KEYS`: ray.*, train.cpus_per_worker, ...) say where and how
    fast the search runs, not what it computes: they may differ between a run and its resume."""
    want = _json({"space": spec.raw, "config": _search_config(to_dict(base))})
    if path.is_file():
        have = json.loads(path.read_text())
        # files written before resources were excluded hold the nested config, ray.* aside
        have = {"space": have.get("space"), "config": _search_config(have.get("config", {}))}
        if have != want:
            raise ConfigError(f"{path.parent} holds a different search (config or space "
                              "differs); use a new --out, or delete it to start over")
        return True
    write_json(path, want)
    return False


def tune(cfg: Config, space: Mapping[str, Any] | str | Path | None = None,
         out: str | Path = "runs/tune") -> TuneOutcome:
    """Run (or resume) the search in ``out`` and write the report; see the module doc.

    ``space``: a dict with the space file's structure (``{"search": "grid", "space":
    {"select.threshold": {"grid": [0.8, 0.9]}}}``), a YAML file's path, or None (thresholds ×
    every backend). Progress goes to ``logging.getLogger("raysl")``."""
    t0 = time.perf_counter()
    root = Path(out).resolve()
    base = _absolute_paths(cfg)
    spec = load_space(space, base, tuple(BACKENDS))
    if spec.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("space file: search=optuna needs the optuna package "
                              "(pip install optuna)") from None
    # Everything that can fail on bad input, before Ray starts: every upstream setting's data
    # split and backend name. A user's files are the exception: their names and plan are
    # checked first, then read through Ray Data in the search's own Ray, so that the pool and
    # test set stay in the object store (as `raysl run` does) and the trials get these splits
    # instead of reading the data again.
    prefit = [apply_overrides(base, ov) for ov in prefit_overrides(spec, base)]
    started = False
    try:
        for c in prefit:
            started = pipeline.start_ray_for_data(c) or started
        splits: dict[str, Split] = {}
        for c in prefit:
            k = _data_key(c)
            splits[k] = splits[k] if k in splits else pipeline.check(c)
        root.mkdir(parents=True, exist_ok=True)
        same = _check_same_search(root / "search.json", spec, base)
        exp = root / EXPERIMENT
        # A driver killed while Tune wrote tuner.pkl leaves it empty: nothing to resume then.
        resume = (same and ray.tune.Tuner.can_restore(str(exp))
                  and (exp / "tuner.pkl").stat().st_size > 0)
        if resume:
            _check_own_tuner(root)  # before Tune unpickles it
    except BaseException:
        if started:
            ray.shutdown()
        raise

    from raysl.distributed.session import ensure_ray

    started = ensure_ray(base.ray) or started
    try:
        from raysl.distributed.resources import check_resources

        check_resources(base)  # every trial asks for the same workers
        logger.info("[tune] %s %s: %s over %s (%d trials)",
                    "resuming the search in" if resume else "search:", root, spec.search,
                    ", ".join(spec.keys), n_trials(spec))
        # Fit every baseline and backend the trials will read, once, before they start.
        fits = 0
        for c in prefit:
            split = splits[_data_key(c)]
            _, _, pl, _ = _upstream(c, root, split=split, verbose=False)
            fits += sum(not r["cached"] for r in pl.get("ranked", [pl]))
        logger.info("[tune] %d upstream setting(s) ready (%d backend fit(s) now, the rest "
                    "cached)", len(prefit), fits)
        concurrency = spec.max_concurrent_trials or _auto_concurrency(base)
        logger.info("[tune] up to %d trial(s) at once, %s CPU each + %d worker(s) × %s CPU%s",
                    concurrency, TRIAL_CPUS, max(base.train.num_workers, 1),
                    base.train.cpus_per_worker, " + 1 GPU" if base.train.use_gpu else "")
        tuner = _tuner(spec, base, root, concurrency, resume, splits)
        if not resume:  # Tune wrote tuner.pkl just now, once: remember it is ours
            write_text(root / OWNER_FILE, sha256_file(exp / "tuner.pkl") + "\n")
        with quiet_tune_console():
            results = tuner.fit()
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
    if any(not p.categorical and changes_a_fit(p.key, spec, base) for p in spec.params):
        notes.append("keys drawn from ranges that change the baseline or backend fit are "
                     "fitted by the trials that draw them (and cached)")
    wall = time.perf_counter() - t0
    table = write_report(root, records, ReportInputs(
        spec, base, best_cfg, str(replay) if replay else "", wall, n_val, n_test, notes))
    logger.info("\n%s", table)
    if top is not None:
        logger.info("\n[tune] best by %s: %s; config %s; report %s; wall time %.0fs",
                    spec.metric, top.trial_id, root / "best.yaml", root / "report.md", wall)
    else:
        logger.info("\n[tune] no trial completed; report %s", root / "report.md")
    return TuneOutcome(root, records, top, best_cfg, replay, fits, resume, wall, table, notes)
