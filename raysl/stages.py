"""What each stage's result depends on: one table, used for the pipeline's cache keys, Tune's
shared fits and its prefit planning.

A stage is redone exactly when a config key it depends on changes (or its data, or an upstream
stage it reads). Keys that say *where* or *how fast* work runs (:data:`RESOURCE_KEYS`) are in no
stage: changing them never refits anything, and a resumed run may change them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from raysl.config import Config, get, valid_keys

# Where and how fast, never what: excluded from every stage.
RESOURCE_KEYS: tuple[str, ...] = (
    "train.cpus_per_worker", "train.use_gpu", "train.checkpoint_every",
    "train.share_storage", "backend.shard_storage",
    "backend.actor_cpus", "data.root", "data.download", "ray.",
)


@dataclass(frozen=True)
class Stage:
    """``keys``: dotted keys or prefixes ending in "." (``"{backend}"`` is the backend's name);
    ``unless``: keys or prefixes excluded from them; ``upstream``: stages whose result it reads."""

    keys: tuple[str, ...]
    unless: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()


# The data split's own content key (raysl.data.Split.key) stands for data.labels_per_class,
# val_per_class, test_fraction, seed and the data itself; every stage below reads the split.
STAGES: dict[str, Stage] = {
    # lambda_u is zeroed for the baseline, which makes the online-pseudo-label keys inert.
    "baseline": Stage(("data.", "train."), unless=(
        "data.n_shards", "train.lambda_u", "train.fixmatch_threshold", "train.threshold_mode",
        "train.dist_align", "train.offline")),
    # the `self` backend reads the baseline's weights; the others only the labeled rows
    "backend": Stage(("data.", "backend.name", "backend.calibrate", "backend.{backend}.")),
    "backend:self": Stage(("data.", "backend.name", "backend.calibrate"),
                          upstream=("baseline",)),
    # gmm, vae or gan in the baseline classifier's embedding (backend.<name>.features=
    # embedding)
    "backend:embedding": Stage(("data.", "backend.name", "backend.calibrate",
                                "backend.{backend}."), upstream=("baseline",)),
    "select": Stage(("select.",), upstream=("backend", "baseline")),
    "joint": Stage(("data.", "train."), unless=("data.n_shards",), upstream=("select",)),
}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def stage_name(stage: str, cfg: Config) -> str:
    """``"backend"`` resolves to ``"backend:<name>"`` when that has an entry of its own, and
    to ``"backend:embedding"`` for a backend fitted in the baseline's embedding."""
    if stage != "backend":
        return stage
    b = cfg.backend
    if b.in_embedding:
        return "backend:embedding"
    return f"backend:{b.name}" if f"backend:{b.name}" in STAGES else stage


def is_resource_key(key: str) -> bool:
    """True for a dotted key of :data:`RESOURCE_KEYS` (where/how fast, in no stage)."""
    return _matches(key, RESOURCE_KEYS)


def _variants(stage: str, cfg: Config) -> list[Config]:
    """``backend.name=auto`` fits each of ``raysl.backends.AUTO_BACKENDS``: its backend stage
    depends on what each of theirs does (the pipeline keys each candidate's cache by its own
    name, so this only matters to planning, e.g. Tune's prefits)."""
    if stage == "backend" and cfg.backend.name == "auto":
        from raysl.backends import AUTO_BACKENDS  # lazy: the registry imports torch

        return [replace(cfg, backend=replace(cfg.backend, name=n)) for n in AUTO_BACKENDS]
    return [cfg]


def depends_on(stage: str, cfg: Config) -> list[str]:
    """The dotted config keys ``stage``'s own result depends on (upstream stages' not
    included), e.g. ``depends_on("backend", cfg)`` with gmm: ``data.*``, ``backend.gmm.*``..."""
    keys: set[str] = set()
    for c in _variants(stage, cfg):
        s = STAGES[stage_name(stage, c)]
        pats = [k.replace("{backend}", c.backend.name) for k in s.keys]
        keys |= {k for k in valid_keys() if _matches(k, pats) and not _matches(k, s.unless)}
    return [k for k in valid_keys() if k in keys and not is_resource_key(k)]


def upstream(stage: str, cfg: Config) -> tuple[str, ...]:
    ups: list[str] = []
    for c in _variants(stage, cfg):
        ups += [u for u in STAGES[stage_name(stage, c)].upstream if u not in ups]
    return tuple(ups)


def closure(stage: str, cfg: Config) -> list[str]:
    """Every key ``stage`` depends on, its upstream stages' included (sorted)."""
    keys = set(depends_on(stage, cfg))
    for up in upstream(stage, cfg):
        keys |= set(closure(up, cfg))
    return sorted(keys)


def config_part(stage: str, cfg: Config) -> dict[str, Any]:
    """``{key: value}`` for :func:`depends_on`: the config half of a stage's cache key."""
    return {k: get(cfg, k) for k in depends_on(stage, cfg)}


def changes_upstream_of(key: str, stage: str, cfg: Config) -> bool:
    """True when ``key`` changes ``stage``'s result or an upstream stage's (e.g. for Tune:
    does a searched key need its own backend fit?)."""
    return key in closure(stage, cfg)


def cache_key(*parts: Any) -> str:
    """A short stable hash of ``parts``: nested dicts, lists, scalars and numpy arrays (by
    dtype, shape and bytes: never their abbreviated ``str``)."""
    h = hashlib.sha256()
    _update(h, parts)
    return h.hexdigest()[:12]


def _update(h: Any, obj: Any) -> None:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"ndarray:{a.dtype.str}:{a.shape}:".encode())
        h.update(a.tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(json.dumps(str(k)).encode() + b":")
            _update(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, list | tuple):
        h.update(b"[")
        for v in obj:
            _update(h, v)
            h.update(b",")
        h.update(b"]")
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
