"""The pipeline: baseline classifier -> backend pseudo-labels -> selection -> joint training.

Every stage writes its result into the output directory under a key made of everything it
depends on, and is skipped when that result is already there; an interrupted joint training
resumes from its last Ray Train checkpoint. So running the same command again resumes, and a
threshold change re-uses the cached probabilities (no refit).

Layout of ``out/``::

    config.yaml             the resolved config
    baseline/               supervised-only classifier (model.pt, result.json)
    cache/labels-*/         each backend fit's labels and confidences of every unlabeled row
                            (meta.npz, and part-<i>.npz per shard)
    pseudo_labels.parquet/  row, label, confidence, backend, selected (part-<i>.parquet per
                            shard, written where the shard's labels are)
    joint/                  the jointly trained classifier (model.pt, result.json)
    model.pt                the final model: joint or baseline, whichever scores higher on the
                            validation split (metrics.json ``final`` says which and why)
    metrics.json            everything measured
    ray/                    Ray Train runs and checkpoints
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysl.backends import (
    AUTO_BACKENDS,
    BACKENDS,
    FitContext,
    calibration_floor,
    needs_classifier,
)
from raysl.backends.base import (
    Executor,
    FitResult,
    LabelCall,
    LocalExecutor,
    Shard,
    ShardWorker,
    fit,
)
from raysl.calibration import FLOOR, Calibration, apply_temperature, calibrate
from raysl.columns import PoolColumns, PoolSelection, split_columns
from raysl.config import Config, TrainConfig, dump_yaml
from raysl.data import (
    Dataset,
    Remote,
    Split,
    load_dataset,
    make_split,
    materialize,
    shard,
    shard_bounds,
)
from raysl.errors import ConfigError
from raysl.io import atomic_dir, sha256_file, write_json, write_npz, write_text, write_with
from raysl.memory import trim
from raysl.metrics import (
    ece_from_bins,
    expected_calibration_error,
)
from raysl.models import Standardize, build_model
from raysl.preprocess import standardize_split
from raysl.select import class_prior, total_variation
from raysl.stages import cache_key, config_part
from raysl.text import SentenceEncoder
from raysl.train import TrainData, accuracy, fit_classifier, predict_proba, state_from_numpy

logger = logging.getLogger("raysl")


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def check(cfg: Config, dataset: Dataset | None = None) -> Split:
    """Validate names and data and build the split: everything that can fail on bad input,
    before Ray starts. ``dataset``: in-memory data instead of ``cfg.data.dataset``."""
    _check_names(cfg)  # before loading the data: a typo fails at once
    split = _split_in_store(cfg) if dataset is None else None
    if split is None:
        split = make_split(dataset if dataset is not None else load_dataset(cfg.data), cfg.data)
    return _prepared(split, cfg)


def _split_in_store(cfg: Config) -> Split | None:
    """A user's files read by a reader of :mod:`raysl.readers` in a run on Ray (``ray.enabled``
    and a session up, as :func:`start_ray_for_data` makes it): the split with the unlabeled
    pool and the test set left in Ray's object store, where shard actors, Train workers and
    evaluation tasks fetch their rows (:func:`raysl.distributed.pool.distribute`); the driver
    holds the labeled and validation rows. None otherwise: the data is read into memory."""
    from raysl.data import DATASETS

    if not cfg.ray.enabled or cfg.data.dataset in DATASETS:
        return None
    import ray

    if not ray.is_initialized():
        return None
    from raysl.readers import plan

    p = plan(cfg.data)
    return None if p is None else p.split(cfg.data.dataset, cfg.data)


def start_ray_for_data(cfg: Config) -> bool:
    """Join or start this run's Ray (``cfg.ray``: its address, its CPUs) before the data is
    loaded, when ``cfg.ray.enabled`` and a reader of :mod:`raysl.readers` reads
    ``cfg.data.dataset`` (a user's tables or images, through Ray Data): the read then runs in
    the run's own session instead of a local Ray started and stopped for it. The config's
    names and the reader's plan (listing, headers, columns) are checked first, without Ray, so
    bad input still fails before Ray starts. Returns True when this call started Ray."""
    from raysl.data import DATASETS

    if not cfg.ray.enabled or cfg.data.dataset in DATASETS:
        return False
    _check_names(cfg)
    from raysl.readers import plan

    if plan(cfg.data) is None:  # an .npz, a text file: read without Ray
        return False
    from raysl.distributed.session import ensure_ray

    return ensure_ray(cfg.ray)


def _check_names(cfg: Config) -> None:
    if cfg.backend.name not in (*BACKENDS, "auto"):
        raise ConfigError(f"backend.name={cfg.backend.name!r}: unknown backend; allowed: "
                          f"auto, {', '.join(BACKENDS)}")


def prepare(split: Split, cfg: Config) -> Split:
    """A split made elsewhere (e.g. by the estimator), checked and standardized as
    :func:`check` does."""
    _check_names(cfg)
    return _prepared(split, cfg)


def _prepared(split: Split, cfg: Config) -> Split:
    """What :func:`check` and :func:`prepare` do to a split once the names are checked."""
    _check_model(split, cfg)
    split = _standardized(split, cfg)
    trim()  # the split's transient per-row arrays (raysl.memory)
    return split


def _standardized(split: Split, cfg: Config) -> Split:
    return standardize_split(split, cfg.data.n_shards) if cfg.data.standardize else split


def _check_model(split: Split, cfg: Config) -> None:
    """The classifier the config asks for fits the data's shape (before any training)."""
    if len(split.input_shape) == 3 and cfg.train.hidden == 0:
        raise ConfigError(f"train.hidden=0: a linear classifier takes vectors, and "
                          f"{cfg.data.dataset!r} holds images {split.input_shape}; use -1 (by "
                          "the data) or a width > 0")


def check_out(out: Path) -> None:
    """Make ``out`` (and parents) and prove it writable, or raise ConfigError naming it."""
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {str(out)!r}: {str(p)!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--out {str(out)!r}: not a writable directory ({e.strerror or e})"
                          ) from None


# -- stage 1 and 4: classifiers -------------------------------------------------------------

def model_width(train: TrainConfig, split: Split) -> int:
    """The classifier's hidden width for this data: ``train.hidden``, or for ``-1`` (the
    default) 0 (a linear classifier) on a pretrained text encoder's vectors, 256 otherwise.
    rt_polarity, 3 seeds: linear 58.6% / 66.3% at 10 / 50 labels per class, the MLP 57.6% /
    65.8%, in half the time (README, Text)."""
    if train.hidden >= 0:
        return train.hidden
    return 0 if isinstance(split.text, SentenceEncoder) else 256


def _with_width(cfg: Config, split: Split) -> TrainConfig:
    return replace(cfg.train, hidden=model_width(cfg.train, split))


def _save_model(path: Path, state: dict[str, np.ndarray], split: Split, cfg: Config) -> None:
    payload: dict[str, Any] = {"model": state_from_numpy(state),
                               "input_shape": list(split.input_shape),
                               "n_classes": split.n_classes,
                               "hidden": model_width(cfg.train, split)}
    if split.standardizer is not None:  # predictions then take raw inputs
        payload["preprocess"] = split.standardizer.state()
    write_with(path, lambda p: torch.save(payload, p))


def load_model(path: str | Path) -> torch.nn.Module:
    """Load a ``model.pt`` written by raysl, in eval mode (weights only: no code runs on
    load). The module takes raw inputs ``(n, ...)`` (the saved standardization, if any, is its
    first layer) and returns logits ``(n, C)``."""
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = build_model(tuple(saved["input_shape"]), saved["n_classes"], saved["hidden"])
    model.load_state_dict(saved["model"])
    if "preprocess" in saved:
        pre = saved["preprocess"]
        model = torch.nn.Sequential(Standardize(pre["mean"], pre["scale"]), model)
    return model.eval()


def train_stage(stage: str, split: Split, cfg: Config, out: Path, data: TrainData,
                key: str, *, callbacks: list[Any] | None = None,
                run_name: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train (or load the cached result of) one classifier; returns its result record.

    On Ray Train when ``cfg.ray.enabled``, else in this process. ``callbacks`` go to the Ray
    Train run (e.g. Tune's TuneReportCallback), ``run_name`` replaces its default name
    ``{stage}-{key}`` (a Tune trial passes a name of its own, stable across restores),
    ``verbose`` logs one line per epoch."""
    d = out / stage
    record_path = d / "result.json"
    record = verified_record(d, key)
    if record is not None:
        logger.info("[%s] cached result found (%s); skipping training", stage, record_path)
        record["cached"] = True
        return record
    where = (f"{cfg.train.num_workers} Ray Train worker(s)" if cfg.ray.enabled
             else "in this process")
    logger.info("[%s] training: %d labeled + %d pseudo-labeled rows, %d epochs, %s", stage,
                len(data.y_l), len(data.x_p), cfg.train.epochs, where)
    if cfg.ray.enabled:
        from raysl.distributed.trainer import train_classifier

        outcome = train_classifier(data, _with_width(cfg, split), split.input_shape,
                                   split.n_classes,
                                   cfg.ray.storage_path or out / "ray",
                                   run_name or f"{stage}-{key}", verbose=verbose,
                                   callbacks=callbacks)
    else:
        # Rows left in the object store, trained in this process (a Tune trial with
        # train.num_workers=0): fetched here, as the one rank that holds every row.
        data = data.for_rank(0, 1, lambda field, share: materialize(getattr(data, field)))
        outcome = fit_classifier(data, _with_width(cfg, split), split.input_shape,
                                 split.n_classes, name=stage, verbose=verbose)
    model = build_model(split.input_shape, split.n_classes, model_width(cfg.train, split))
    model.load_state_dict(state_from_numpy(outcome.state))
    _save_model(d / "model.pt", outcome.state, split, cfg)
    val_proba = predict_proba(model, split.x_val)
    record = {
        "key": key,
        "files": {"model.pt": sha256_file(d / "model.pt")},  # checked on every reuse
        "test_accuracy": test_accuracy(model, outcome.state, split, cfg),
        "val_accuracy": _accuracy(val_proba, split.y_val),
        "val_ece": expected_calibration_error(val_proba, split.y_val),
        "seconds": outcome.seconds,
        "epochs": len(outcome.history),
        "resumed_from_epoch": outcome.resumed_from_epoch,
        "nodes": len(set(outcome.nodes)) or 1,
        # the rows each rank read through Ray Data (a split left in the object store)
        "rank_rows": outcome.rank_rows,
        "history": outcome.history,
    }
    write_json(record_path, json_safe(record))  # last: its presence marks the stage done
    record["cached"] = False
    return record


def test_accuracy(model: torch.nn.Module, state: dict[str, np.ndarray], split: Split,
                  cfg: Config) -> float:
    """The model's accuracy on the test split (NaN without test rows); a test set left in the
    object store is predicted by tasks where it lives (``state``: the model's weights)."""
    if len(split.y_test) and isinstance(split.x_test, Remote):
        build = partial(build_model, split.input_shape, split.n_classes,
                        model_width(cfg.train, split))
        pred = split.x_test.predict(state, build)  # type: ignore[attr-defined]
        return float((pred == split.y_test).mean())
    return accuracy(model, split.x_test, split.y_test)


def verified_record(d: Path, key: str | None = None) -> dict[str, Any] | None:
    """The stage record in ``d/result.json`` when it is complete, made with ``key`` (None:
    any) and every file it lists has the checksum recorded; else None. A corrupt or truncated
    stage is reported (a warning) and removed, so the caller redoes it."""
    path = d / "result.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
    except (ValueError, KeyError, TypeError, OSError):
        record, files = None, None
    if record is not None and key is not None and record.get("key") != key:
        return None  # another config's result: redone, not corrupt
    bad = ([f for f, digest in files.items() if not (d / f).is_file()
            or sha256_file(d / f) != digest] if files is not None else ["result.json"])
    if not bad:
        return record
    logger.warning("%s: %s corrupt or incomplete (checksum); removing it and redoing this "
                   "stage", d, ", ".join(bad))
    for f in ["result.json", *(files or {})]:
        (d / f).unlink(missing_ok=True)
    return None


def _empty_pseudo(split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.zeros((0, *split.input_shape), np.float32), np.zeros(0, np.int64),
            np.zeros(0, np.float32))


def baseline(split: Split, cfg: Config, out: Path, **train_kwargs: Any) -> dict[str, Any]:
    """Stage 1: the supervised-only classifier (same network and budget as the joint one).
    ``train_kwargs``: ``callbacks``, ``run_name``, ``verbose`` of :func:`train_stage`."""
    tcfg = replace(cfg.train, lambda_u=0.0)
    data = TrainData(split.x_l, split.y_l, *_empty_pseudo(split), split.x_val, split.y_val,
                     len(split.x_u))
    return train_stage("baseline", split, replace(cfg, train=tcfg), out, data,
                       baseline_key(split, cfg), **train_kwargs)


def baseline_key(split: Split, cfg: Config) -> str:
    return cache_key("baseline", split.key, config_part("baseline", cfg))


# -- stage 2: backends ----------------------------------------------------------------------

@contextmanager
def shard_workers(split: Split, cfg: Config, ctx: FitContext, use_ray: bool
                  ) -> Iterator[tuple[Executor, int]]:
    """``cfg.backend``'s workers over ``cfg.data.n_shards`` unlabeled shards, and the number of
    Ray nodes they run on: one Ray actor per shard (``use_ray``; stopped when the block ends)
    or a loop in this process, with the same results."""
    b = cfg.backend
    factory = BACKENDS[b.name]
    shards = [Shard(x, split.x_l, split.y_l, i)
              for i, x in enumerate(shard(split.x_u, cfg.data.n_shards))]
    if use_ray:
        from raysl.distributed.actors import RayExecutor

        # No GPU: no backend uses one (train.use_gpu is the classifier's).
        with RayExecutor(factory, b, ctx, shards, b.actor_cpus) as ex:
            yield ex, len(set(ex.node_ids()))
        return
    yield LocalExecutor([ShardWorker(factory, b, ctx, s) for s in shards]), 1


def fit_backend(split: Split, cfg: Config, ctx: FitContext, use_ray: bool,
                progress: Callable[[int, float], None] | None = None) -> tuple[FitResult, int]:
    """Fit ``cfg.backend`` over the shards (:func:`shard_workers`) and gather every unlabeled
    row's probabilities (benchmarks; the pipeline keeps only labels, :func:`pseudo_label`).
    Returns the fit and the number of Ray nodes the shards ran on."""
    with shard_workers(split, cfg, ctx, use_ray) as (ex, nodes):
        return fit(BACKENDS[cfg.backend.name](cfg.backend, ctx), ex, split.x_l, split.y_l,
                   progress=progress), nodes


def _accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(1) == y).mean()) if len(y) else float("nan")


def pseudo_label(split: Split, cfg: Config, out: Path, classifier_state: dict[str, Any],
                 use_ray: bool | None = None, cache_dir: Path | None = None,
                 require_cached: bool = False) -> dict[str, Any]:
    """Stage 2: fit the backend over the unlabeled shards (Ray actors, or a local loop; default
    ``cfg.ray.enabled``) and cache its probabilities in ``cache_dir`` (default ``out/cache``).
    Returns ``{"backend", "pool": PoolColumns, "val_proba": (n_val, C), "val_accuracy",
    "val_ece", "key", "seconds", ...}``: ``pool`` holds each unlabeled row's argmax label and
    calibrated probability, also after alignment to the labeled class prior
    (``select.align``), in the shard workers' parts (:mod:`raysl.columns`; on Ray, in the
    object store), where the probabilities (n_u, C) stay too
    (:meth:`~raysl.backends.base.ShardWorker.label`); every backend also predicts the labeled
    validation rows, an honest estimate of its accuracy and calibration.
    ``"actors"`` (a fresh fit on Ray actors): each actor's rows, whether it kept them on disk
    (``backend.shard_storage``) and its memory.

    ``backend.name=auto`` fits each of :data:`AUTO_BACKENDS` and returns the one with the best
    validation accuracy, with every candidate's record under ``"ranked"`` (best first)."""
    use_ray = cfg.ray.enabled if use_ray is None else use_ray
    if cfg.backend.name == "auto":
        recs = [pseudo_label(split, replace(cfg, backend=replace(cfg.backend, name=name)), out,
                             classifier_state, use_ray, cache_dir, require_cached)
                for name in AUTO_BACKENDS]
        ranked = sorted(recs, key=lambda r: -_nan_low(r["val_accuracy"]))  # stable: ties
        logger.info("[pseudo-label] auto: validation accuracy %s; best: %s", ", ".join(
            f"{r['backend']} {_pct(r['val_accuracy'])}" for r in recs), ranked[0]["backend"])
        return {**ranked[0], "ranked": ranked}
    b = cfg.backend
    reads_classifier = needs_classifier(b)
    ctx = FitContext(split.n_classes, split.input_shape, cfg.data.seed,
                     model_width(cfg.train, split),
                     classifier_state if reads_classifier else None)
    # `self` (and any backend in the embedding) depend on the baseline through its weights (which
    # hold train.hidden)
    from raysl.calibration import VERSION as CALIBRATION

    key = cache_key(b.name, split.key, config_part("backend", cfg),
                    classifier_state if reads_classifier else None,
                    CALIBRATION if b.calibrate else None, _CACHE_FORMAT)
    path = cache_path(cache_dir or out / "cache", b.name, key)
    base = split_columns(split.idx_u, split.y_u,
                         shard_bounds(len(split.x_u), cfg.data.n_shards), _putter(use_ray))
    cached = _read_cache(path, base)
    if cached is None and require_cached:
        raise ConfigError(f"{path.parent}: no {b.name} probabilities for this config (backend.* "
                          "differ from the pseudo-label run's); run `raysl pseudo-label` with "
                          "this --out first")
    if cached is not None:
        logger.info("[pseudo-label] cached %s probabilities found (%s); no refit", b.name, path)
        val_proba = cached["val_proba"]
        pool = cached["pool"]
        info = {"seconds": float(cached["seconds"]), "rounds": int(cached["rounds"]),
                "objective": cached["objective"].tolist(), "nodes": int(cached["nodes"]),
                "temperature": float(cached["temperature"]),
                "ece_uncalibrated": float(cached["ece_uncalibrated"]), "cached": True}
    else:
        factory = BACKENDS[b.name]
        logger.info("[pseudo-label] fitting %s over %d shard(s) of %d unlabeled rows%s",
                    b.name, cfg.data.n_shards, len(split.x_u),
                    " with Ray actors" if use_ray else "")

        def progress(rnd: int, obj: float) -> None:
            if rnd == 1 or rnd % 10 == 0:  # a set-up round (e.g. the GMM's PCA): no objective
                logger.info("[pseudo-label] round %d: %s", rnd,
                            f"objective {obj:.6g}" if math.isfinite(obj)
                            else "set-up (no objective yet)")

        with shard_workers(split, cfg, ctx, use_ray) as (ex, nodes):
            res = fit(factory(b, ctx), ex, split.x_l, split.y_l, progress=progress,
                      predict=False)
            # The fitted backend predicts the validation rows on the driver (they are few).
            labeler = factory(b, ctx)
            labeler.load_state_dict(res.state)
            val_proba = (labeler.predict_proba(split.x_val) if len(split.x_val)
                         else np.zeros((0, split.n_classes)))
            cal = _calibration(b, val_proba, split.y_val)
            temperature = float("nan") if cal is None else cal.temperature  # NaN: not calibrated
            if cal is not None:
                val_proba = apply_temperature(val_proba, cal.temperature, floor=cal.floor)
            pool, ece_raw = pool_labels(ex, LabelCall(
                res.state, 1.0 if cal is None else cal.temperature,
                FLOOR if cal is None else cal.floor, key), split, base)
            # each Ray actor's rows, where it kept them and its memory (with its rows held)
            actors = ex.memory()
        logger.info("[pseudo-label] %s: %d round(s) in %.1fs on %d node(s)", b.name,
                    res.rounds, res.seconds, nodes)
        _write_cache(path, pool, val_proba=val_proba, seconds=res.seconds,
                     rounds=res.rounds, objective=np.asarray(res.objective, np.float64),
                     nodes=nodes, temperature=temperature, ece_uncalibrated=ece_raw)
        info = {"seconds": res.seconds, "rounds": res.rounds, "objective": res.objective,
                "nodes": nodes, "temperature": temperature, "ece_uncalibrated": ece_raw,
                "cached": False, "actors": actors}
        del res, labeler
        trim()  # the fit's transient per-row arrays (raysl.memory)
    return {"backend": b.name, "pool": pool, "val_proba": val_proba, "key": key,
            "val_accuracy": _accuracy(val_proba, split.y_val),
            "val_ece": expected_calibration_error(val_proba, split.y_val), **info}


def _calibration(b: Any, val_proba: np.ndarray, y_val: np.ndarray) -> Calibration | None:
    """Temperature scaling on the validation split (``backend.calibrate``; bounded, and a
    degenerate fit keeps T = 1): the argmax labels don't change, the confidences do. None:
    not calibrated (off, or no validation rows)."""
    if not b.calibrate or not len(y_val):
        return None
    cal = calibrate(val_proba, y_val, floor=calibration_floor(b.name))
    logger.info("[pseudo-label] %s: temperature scaling on %d validation rows: T=%.3g, floor "
                "%.0e (validation NLL %.3f, %.3f at T=1%s)", b.name, cal.n, cal.temperature,
                cal.floor, cal.nll, cal.nll_one, "" if cal.accepted else
                f"; the fit, {cal.fitted:.3g}, is degenerate: T=1 kept")
    return cal


def pool_labels(ex: Executor, call: LabelCall, split: Split, base: PoolColumns
                ) -> tuple[PoolColumns, float]:
    """What the pipeline keeps of the fitted backend's probabilities for the unlabeled rows,
    each shard's computed by its worker and left there (the probabilities (n_u, C) are not
    gathered, nor are the rows' labels): ``base`` (the split's columns) joined with every
    row's argmax label and calibrated probability (``label``, ``conf``) and the same after
    alignment to the labeled rows' class prior from the pool's mean prediction
    (``label_aligned``, ``conf_aligned``); and the uncalibrated probabilities' ECE against
    the hidden labels (NaN: none known)."""
    parts = ex.label(call, shard(split.y_u, len(base.sizes)))
    p_model = sum(p[0].psum for p in parts) / max(len(base), 1)
    aligned = ex.aligned(call, p_model, class_prior(split.y_l, split.n_classes))
    pool = base.join([p[1] for p in parts]).join(aligned)
    return pool, ece_from_bins(sum(p[0].ece_bins_raw for p in parts))


# Part of every backend cache's key: 3, labels and confidences in one file per shard.
_CACHE_FORMAT = 3
_CACHE_META = ("val_proba", "seconds", "rounds", "objective", "nodes", "temperature",
               "ece_uncalibrated")


def cache_path(cache_dir: Path, backend: str, key: str) -> Path:
    """The folder of a backend fit's cache: ``meta.npz`` (what the driver keeps) and one
    ``part-<i>.npz`` per shard (its rows' labels and confidences, :meth:`PoolColumns.save`)."""
    return cache_dir / f"labels-{backend}-{key}"


def _putter(use_ray: bool) -> Callable[[Any], Any] | None:
    if not use_ray:
        return None
    import ray

    return ray.put


def _write_cache(path: Path, pool: PoolColumns, **meta: Any) -> None:
    """The parts written where they are, then ``meta.npz``, into a temporary folder renamed
    onto ``path``: a cache is whole or absent (a concurrent fit of the same key that
    finished first is kept: the same content)."""
    with atomic_dir(path, keep_existing=True) as tmp:
        pool.save(tmp)
        write_npz(tmp / "meta.npz", **meta)


def _read_cache(path: Path, base: PoolColumns) -> dict[str, Any] | None:
    """A backend's cached labels (``meta.npz``'s arrays and ``pool``: ``base`` joined with
    the parts), or None when missing. A truncated or corrupt file (the zip's CRCs catch it;
    every part is read once here, where it is used) is reported, removed and refitted."""
    import shutil

    if not (path / "meta.npz").is_file():
        return None
    try:
        with np.load(path / "meta.npz", allow_pickle=False) as f:
            cached: dict[str, Any] = {k: f[k] for k in _CACHE_META}
        pool = base.load(path)
        # read every part now (a corrupt one raises here, not in a later stage)
        pool.map(_check_part)
        cached["pool"] = pool
    except Exception as e:
        cause = getattr(e, "cause", e)  # a Ray task's error wraps the reader's
        if not isinstance(cause, _CORRUPT):
            raise
        logger.warning("%s: corrupt or incomplete (%s); removing it and refitting", path,
                       type(cause).__name__)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return cached


_CORRUPT = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _check_part(i: int, offset: int, cols: dict[str, np.ndarray]) -> int:
    return len(cols["label"])


def _nan_low(x: float) -> float:
    return x if math.isfinite(x) else -1.0


# -- stage 3: selection ---------------------------------------------------------------------

def write_pseudo_labels(path: Path, sel: PoolSelection, backend: str) -> None:
    """``path`` (a Parquet dataset: a folder of one file per shard, each written where its
    shard's labels are): columns ``row``, ``label``, ``confidence``, ``backend``,
    ``selected``. Written into a temporary folder and renamed onto ``path``, so a reader sees
    the old one whole or the new one whole."""
    with atomic_dir(path) as tmp:
        sel.write_parquet(tmp, backend)


def joint(split: Split, cfg: Config, out: Path, sel: PoolSelection, stage: str = "joint",
          **train_kwargs: Any) -> dict[str, Any]:
    """Stage 4: labeled CE + lambda_u × confidence-weighted CE on the kept pseudo-labels,
    into ``out/<stage>/``. ``train_kwargs``: ``callbacks``, ``run_name``, ``verbose`` of
    :func:`train_stage`."""
    # Keyed by the selection's content, so `raysl train` after `raysl pseudo-label` finds the
    # same cached result as `raysl run`.
    sel_key = sel.digest()
    if isinstance(split.x_u, Remote) and sel.pool.remote and cfg.ray.enabled:
        data = _remote_train_data(split, cfg, sel)
    else:
        kept, y_p, w_p = sel.kept()
        m = np.zeros(len(split.x_u), bool)
        m[kept] = True
        # train.fixmatch labels the whole unlabeled pool online; y_u only measures those labels
        online: dict[str, Any] = {}
        if cfg.train.fixmatch:
            online = {"x_u": split.x_u, "y_u": split.y_u}
            if cfg.train.offline == "prior" and len(kept):  # every row's label, kept or not
                prior_label, prior_conf = sel.every()
                online.update(prior_label=prior_label, prior_conf=prior_conf)
        data = TrainData(split.x_l, split.y_l, split.x_u[m], y_p, w_p, split.x_val,
                         split.y_val, len(split.x_u), **online)
    key = cache_key("joint", split.key, config_part("joint", cfg), sel_key)
    trim()  # the selection's transient per-row arrays, before the job starts (raysl.memory)
    return train_stage(stage, split, cfg, out, data, key, **train_kwargs)


def _remote_train_data(split: Split, cfg: Config, sel: PoolSelection) -> TrainData:
    """The joint job's data when the pool's rows and its labels are both in the object store:
    the kept rows' labels and confidences (and, with FixMatch, every row's true label where
    known; with ``train.offline=prior`` its backend label and confidence) are read by each
    rank with its share of the rows (:class:`raysl.columns.RowColumns`), so neither the
    driver nor a rank holds them for all rows; ``y_p`` and ``w_p`` are empty here."""
    from raysl.distributed.pool import RemoteRows

    assert isinstance(split.x_u, RemoteRows)
    x_p = split.x_u.with_columns(sel.row_columns({"y_p": sel.names[0], "w_p": sel.names[1]}))
    online: dict[str, Any] = {}
    if cfg.train.fixmatch:  # y_u: the rows' true labels where known, to measure FixMatch's
        names = {"y_u": "y"}
        if cfg.train.offline == "prior" and len(x_p):  # every row's label, kept or not
            names.update(prior_label=sel.names[0], prior_conf=sel.names[1])
        online = {"x_u": split.x_u.with_columns(sel.pool.row_columns(names))}
    none = np.zeros(0)
    return TrainData(split.x_l, split.y_l, x_p, none.astype(np.int64), none.astype(np.float32),
                     split.x_val, split.y_val, len(split.x_u), **online)


def relabel_rounds(split: Split, cfg: Config, out: Path) -> tuple[str, list[dict]]:
    """Rounds 2.. of iterative self-training: the previous round's joint model re-labels the
    unlabeled pool (the `self` backend, ``cfg.select``), and the joint model is trained again
    into ``out/joint-<round>/``. Returns the last round's stage name and one record per round."""
    relabel = replace(cfg, backend=replace(cfg.backend, name="self"))
    last, records = "joint", []
    for r in range(2, cfg.backend.relabel_rounds + 1):
        pl = pseudo_label(split, relabel, out, load_state(out / last / "model.pt"))
        sel, plm = selection(split, relabel, pl)
        logger.info("[relabel %d] %d rows kept, precision %s", r, plm["n_selected"],
                    _pct(plm["precision"]))
        last = f"joint-{r}"
        j = joint(split, cfg, out, sel, stage=last)
        records.append({"round": r, "pseudo_labels": plm, "test_accuracy": j["test_accuracy"],
                        "val_accuracy": j["val_accuracy"], "cached": j["cached"]})
    return last, records


# -- the whole thing ------------------------------------------------------------------------

def selection(split: Split, cfg: Config, rec: dict[str, Any]) -> tuple[PoolSelection, dict]:
    """Apply ``cfg.select`` to a backend's labels and confidences (``rec["pool"]`` from
    :func:`pseudo_label`; the aligned ones with ``select.align``), planned and measured by the
    shards (:class:`raysl.columns.PoolSelection`); returns the selection and its metrics:
    precision/coverage against the known true labels, ECE, per-class counts, and the
    total-variation distance of the kept labels' class distribution from the labeled rows'
    (``tv_distance``)."""
    s = cfg.select
    prior = class_prior(split.y_l, split.n_classes)
    sel = PoolSelection.plan(rec["pool"], split.n_classes, s.criterion, s.threshold, s.k_best,
                             prior, s.per_class_share, s.align)
    m = sel.summary(split.n_classes)
    kept = m["per_class"]
    tv = (total_variation(np.asarray(kept) / sum(kept), prior) if sum(kept)
          else float("nan"))
    m.update(backend=rec["backend"], criterion=s.criterion, threshold=s.threshold,
             tv_distance=tv,
             labels="object store" if sel.pool.remote else "driver")  # where they stay
    return sel, m


def guard_reason(cfg: Config, baseline_val_accuracy: float, m: dict[str, Any]) -> str | None:
    """Why the pseudo-labels described by metrics ``m`` (from :func:`selection` plus the
    backend's ``val_accuracy``) would likely hurt, or None when they pass the guard."""
    s = cfg.select
    acc = m.get("val_accuracy", float("nan"))
    if math.isfinite(acc) and math.isfinite(baseline_val_accuracy) \
            and acc < baseline_val_accuracy - s.guard_margin:
        return (f"validation accuracy {_pct(acc)} is below the baseline's "
                f"{_pct(baseline_val_accuracy)} by more than select.guard_margin="
                f"{s.guard_margin}")
    tv = m.get("tv_distance", float("nan"))
    if math.isfinite(tv) and tv > s.guard_max_tv:
        return (f"the kept labels' class distribution is {tv:.2f} (total variation) from the "
                f"labeled rows', more than select.guard_max_tv={s.guard_max_tv}")
    return None


def choose_pseudo_labels(split: Split, cfg: Config, pl: dict[str, Any],
                         baseline_val_accuracy: float
                         ) -> tuple[PoolSelection, dict[str, Any], dict[str, Any]]:
    """The selection from the first backend (best validation accuracy first, with ``auto``)
    whose labels pass the guard; when none does, a warning and an empty selection (joint
    training then uses no offline pseudo-labels). Returns (selection, its metrics, guard)."""
    reasons: list[str] = []
    first: tuple[PoolSelection, dict[str, Any]] | None = None
    for rec in pl.get("ranked", [pl]):
        sel, m = selection(split, cfg, rec)
        m.update(val_accuracy=rec["val_accuracy"], val_ece=rec["val_ece"],
                 fit_seconds=rec["seconds"], rounds=rec["rounds"], nodes=rec["nodes"],
                 cached=rec["cached"], actors=rec.get("actors", []),
                 **_calibration_metrics(split, rec))
        first = first or (sel, m)
        reason = guard_reason(cfg, baseline_val_accuracy, m) if cfg.select.guard else None
        if reason is None:
            return sel, m, {"tripped": False, "used": rec["backend"], "rejected": reasons}
        reasons.append(f"{rec['backend']}: {reason}")
    assert first is not None
    sel, m = first
    msg = ("pseudo-labels not used, joint training without them: " + "; ".join(reasons))
    logger.warning(msg)
    empty = sel.nothing()
    m.update(coverage=0.0, n_selected=0, precision=float("nan"))
    return empty, m, {"tripped": True, "used": None, "rejected": reasons, "message": msg}


def _calibration_metrics(split: Split, rec: dict[str, Any]) -> dict[str, float]:
    """``temperature`` (NaN: not calibrated) and, when it changed the probabilities, the
    pool's ECE without it (``ece_uncalibrated``, against the hidden labels, measured by the
    shard workers before they scaled them)."""
    t = float(rec.get("temperature", float("nan")))
    out = {"temperature": t}
    if math.isfinite(t) and t != 1.0:
        out["ece_uncalibrated"] = float(rec["ece_uncalibrated"])
    return out


def final_choice(base: dict[str, Any] | None, last: dict[str, Any],
                 last_stage: str) -> dict[str, Any]:
    """The final model: the joint one unless the baseline scores strictly higher on the
    validation split (ties keep the joint model). ``base`` None: no baseline to compare."""
    pick = {"model": last_stage, "test_accuracy": last["test_accuracy"],
            "val_accuracy": last["val_accuracy"]}
    if base is None:
        return {**pick, "reason": "no baseline result in this output directory"}
    b, j = _nan_low(base["val_accuracy"]), _nan_low(last["val_accuracy"])
    if b < 0 or j < 0:
        return {**pick, "reason": "no validation rows to compare on (too few labels): the "
                                  "joint model is kept"}
    if b > j:
        return {"model": "baseline", "test_accuracy": base["test_accuracy"],
                "val_accuracy": base["val_accuracy"],
                "reason": f"the baseline scored higher on validation ({_pct(b)} vs "
                          f"{_pct(j)} for {last_stage})"}
    return {**pick, "reason": f"validation accuracy {_pct(j)} >= the baseline's {_pct(b)}"}


STAGE_CHOICES = ("all", "pseudo-label", "train")


def run(cfg: Config, out: str | Path, stages: str = "all",
        split: Split | None = None) -> dict[str, Any]:
    """Run the pipeline into ``out``: ``stages`` "all", "pseudo-label" (baseline, backends,
    selection) or "train" (selection with this config's ``select.*`` from the finished
    pseudo-label stage's cached probabilities, then joint training).

    Validates everything first (for "train": that the upstream stages in ``out`` were made
    from this data and config) and only then writes ``out/config.yaml``; then, when
    ``cfg.ray.enabled``, joins or starts Ray (and stops it if it started it; for a user's files
    read through Ray Data, before the read: :func:`start_ray_for_data`). Progress goes to
    ``logging.getLogger("raysl")``. Returns the metrics also written to
    ``out/metrics.json``."""
    if stages not in STAGE_CHOICES:
        raise ConfigError(f"stages={stages!r}: must be one of {', '.join(STAGE_CHOICES)}")
    t0 = time.perf_counter()
    # a user's files are read through Ray Data in this run's own Ray (one session per run)
    started = split is None and start_ray_for_data(cfg)
    try:
        split = split if split is not None else check(cfg)
        out = Path(out)
        check_out(out)
        upstream: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        if stages == "train":  # cache hits only: no Ray needed, and a mismatch refuses here
            upstream = _finished_upstream(split, cfg, out)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
    if cfg.ray.enabled:
        from raysl.distributed.session import ensure_ray

        started = ensure_ray(cfg.ray) or started
    try:
        if cfg.ray.enabled:  # a request Ray can never place would wait for ever
            from raysl.distributed.resources import check_resources

            check_resources(cfg)
        write_text(out / "config.yaml", dump_yaml(cfg))  # what this run does
        logger.info("raysl: %s: %d labeled, %d unlabeled, %d validation, %d test rows; output "
                    "in %s", cfg.data.dataset, len(split.y_l), len(split.x_u),
                    len(split.y_val), len(split.y_test), out)
        metrics: dict[str, Any] = {"data": {
            "dataset": cfg.data.dataset, "n_labeled": len(split.y_l),
            "n_unlabeled": len(split.x_u), "n_val": len(split.y_val),
            "n_test": len(split.y_test), "split_key": split.key,
            "n_hidden_labels": int((split.y_u >= 0).sum()),  # what pool figures are against
            "standardized": split.standardizer is not None,
            # where the unlabeled pool and test set are: "object store" for a user's files
            # read in a run on Ray (raysl.distributed.pool), else "driver"
            "pool": "object store" if isinstance(split.x_u, Remote) else "driver",
            "input_shape": list(split.input_shape),
            "text_encoder": None if split.text is None else cfg.data.text_encoder}}
        base, pl = upstream if upstream is not None else (baseline(split, cfg, out), None)
        if pl is None and len(split.x_u):
            pl = pseudo_label(split, cfg, out, load_state(out / "baseline" / "model.pt"))
        metrics["baseline"] = {k: base.get(k) for k in (
            "test_accuracy", "val_accuracy", "val_ece", "seconds", "nodes", "cached")}
        sel = _select_and_record(split, cfg, pl, base, metrics)
        if sel is not None:
            write_pseudo_labels(out / "pseudo_labels.parquet", sel,
                                metrics["pseudo_labels"]["backend"] or "")
        # the backends' probabilities (every candidate's, with `auto`) are cached on disk and
        # not needed by the joint job: not held through it
        pl = None
        if stages != "pseudo-label":
            _joint_and_final(split, cfg, out, sel, base, metrics)
    finally:
        if started:
            import ray

            ray.shutdown()
    metrics["wall_seconds"] = time.perf_counter() - t0
    write_json(out / "metrics.json", json_safe(metrics))
    logger.info("%s", summary(metrics, out))
    return metrics


def _finished_upstream(split: Split, cfg: Config, out: Path
                       ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The baseline record and backend probabilities a `raysl train` reuses, or ConfigError
    when ``out`` holds none made from this data and config."""
    base = verified_record(out / "baseline", baseline_key(split, cfg))
    if base is None:
        raise ConfigError(f"--out {str(out)!r}: no finished baseline for this config (data.* or "
                          "train.* differ from the pseudo-label run's, or it did not run); run "
                          "`raysl pseudo-label` (or `raysl run`) with this --out first")
    base["cached"] = True
    if not len(split.x_u):
        return base, None
    state = load_state(out / "baseline" / "model.pt")
    return base, pseudo_label(split, cfg, out, state, use_ray=False, require_cached=True)


def _select_and_record(split: Split, cfg: Config, pl: dict[str, Any] | None,
                       base: dict[str, Any], metrics: dict[str, Any]) -> PoolSelection | None:
    if pl is None:  # no unlabeled rows
        logger.warning("no unlabeled rows: the model is the supervised baseline")
        metrics["pseudo_labels"] = {"coverage": 0.0, "n_selected": 0,
                                    "precision": float("nan"),
                                    "argmax_accuracy": float("nan"), "backend": None}
        return None
    sel, plm, metrics["guard"] = choose_pseudo_labels(split, cfg, pl, base["val_accuracy"])
    metrics["pseudo_labels"] = plm
    if "ranked" in pl:
        metrics["auto"] = {r["backend"]: {"val_accuracy": r["val_accuracy"],
                                          "val_ece": r["val_ece"],
                                          "temperature": r.get("temperature")}
                           for r in pl["ranked"]}
    return sel


def _joint_and_final(split: Split, cfg: Config, out: Path, sel: PoolSelection | None,
                     base: dict[str, Any], metrics: dict[str, Any]) -> None:
    if not len(split.x_u):
        metrics["final"] = {"model": "baseline", "test_accuracy": base["test_accuracy"],
                            "val_accuracy": base["val_accuracy"], "reason": "no unlabeled rows"}
        _install_final(out, "baseline")
        return
    j = joint(split, cfg, out, sel)
    metrics["joint"] = {k: j[k] for k in ("test_accuracy", "val_accuracy", "seconds", "epochs",
                                          "resumed_from_epoch", "nodes", "cached")}
    metrics["joint"]["rank_rows"] = j.get("rank_rows", [])  # not in records before it was
    last, rounds = relabel_rounds(split, cfg, out)
    if rounds:
        metrics["relabel"] = rounds
        metrics["joint"].update({k: rounds[-1][k] for k in ("test_accuracy", "val_accuracy")})
        metrics["joint"]["first_round_test_accuracy"] = j["test_accuracy"]
    final = final_choice(base, metrics["joint"], last)
    metrics["final"] = final
    if final["model"] == "baseline":
        logger.warning("the final model is the baseline: %s", final["reason"])
    _install_final(out, "baseline" if final["model"] == "baseline" else last)


def _install_final(out: Path, stage: str) -> None:
    """Copy ``out/<stage>/model.pt`` to ``out/model.pt``, only as a file whose checksum is
    the one its stage recorded (checked on the copy, before the rename)."""
    record = verified_record(out / stage)
    if record is None:
        raise RuntimeError(f"{out / stage}: the stage's model failed its checksum after "
                           "training; run again to redo it")
    digest = record["files"]["model.pt"]
    data = (out / stage / "model.pt").read_bytes()

    def write(p: Path) -> None:
        p.write_bytes(data)
        if sha256_file(p) != digest:
            raise RuntimeError(f"{p}: the copy of {stage}/model.pt does not match its checksum")

    write_with(out / "model.pt", write)


def load_state(path: Path) -> dict[str, np.ndarray]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in saved["model"].items()}


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) \
        else f"{100 * x:.1f}%"


def _n(x: Any, what: str) -> str:
    return f" ({x} {what})" if x is not None else ""


def summary(m: dict[str, Any], out: Path) -> str:
    """A readable table of a run's metrics; each figure says on how many rows it was measured,
    and figures against hidden labels appear only when there are some."""
    d = m.get("data", {})
    n_test, n_val, n_hidden = d.get("n_test"), d.get("n_val"), d.get("n_hidden_labels")
    test = _n(n_test, "rows")
    rows: list[tuple[str, str, str]] = []

    def add(stage: str, metric: str, value: Any, rows_note: str = "") -> None:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return  # nothing measured (e.g. no test rows, no hidden labels)
        rows.append((stage, metric, (_pct(value) if isinstance(value, float) else str(value))
                     + rows_note))

    if "baseline" in m:
        add("baseline (labeled only)", "test accuracy", m["baseline"]["test_accuracy"], test)
        add("baseline (labeled only)" if not rows else "", "validation accuracy",
            m["baseline"].get("val_accuracy"), _n(n_val, "rows"))
    if "pseudo_labels" in m:
        p = m["pseudo_labels"]
        name = f"pseudo-labels ({p.get('backend') or 'none'})"
        first = len(rows)
        hidden = _n(n_hidden, "hidden labels")
        add(name, "argmax accuracy", p.get("argmax_accuracy"), hidden)
        add(name if len(rows) == first else "", "validation accuracy", p.get("val_accuracy"),
            _n(n_val, "rows"))
        crit = (f"conf > {p['threshold']}" if p.get("criterion") == "threshold"
                else p.get("criterion", "selected"))
        rows.append((name if len(rows) == first else "", f"coverage ({crit})",
                     f"{_pct(p['coverage'])} ({p['n_selected']} rows)"))
        add("", "precision of kept", p.get("precision"), hidden)
        ece = p.get("ece")
        if ece is not None and math.isfinite(ece):
            t, before = p.get("temperature"), p.get("ece_uncalibrated")
            note = hidden
            if hidden and before is not None and math.isfinite(before):  # " (n hidden labels)"
                note = f"{hidden[:-1]}; {before:.3f} before T={t:.2f})"
            rows.append(("", "calibration error (ECE)", f"{ece:.3f}{note}"))
        if m.get("guard", {}).get("tripped"):
            rows.append(("", "guard", "tripped: not used (see metrics.json guard)"))
    if "joint" in m:
        first_acc = m["joint"].get("first_round_test_accuracy", m["joint"]["test_accuracy"])
        add("joint (labeled + pseudo)", "test accuracy", first_acc, test)
    for r in m.get("relabel", []):
        add(f"re-label round {r['round']} (self)", "test accuracy", r["test_accuracy"], test)
    if "final" in m:
        f = m["final"]
        first = len(rows)
        add(f"final model ({f['model']})", "test accuracy", f["test_accuracy"], test)
        rows.append((f"final model ({f['model']})" if len(rows) == first else "",
                     "chosen because", f["reason"]))
    w = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    lines = ["", f"{'stage':<{w[0]}}  {'metric':<{w[1]}}  value", "-" * (sum(w) + 10)]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows]
    if n_test == 0:
        lines.append("no test rows were held out (too few labels per class), so no test "
                     "accuracy" + ("; nor validation rows" if not n_val else ""))
    lines += [f"wall time {m['wall_seconds']:.0f}s; outputs in {out}/ (metrics.json, "
              "pseudo_labels.parquet, model.pt)", ""]
    return "\n".join(lines)
