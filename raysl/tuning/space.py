"""Search spaces for ``raysl tune``, without Ray.

* :func:`parse_space` reads a space (a YAML file's content or the same structure as a dict:
  dotted config keys, as ``--set`` takes them) and validates every value with
  :func:`raysl.config.apply_overrides` before Ray starts;
* :func:`prefit_overrides` plans the fits done once before the trials: the distinct settings of
  the searched keys that change a baseline or backend fit, by the stage table
  (:mod:`raysl.stages`).

:mod:`raysl.tuning.search` turns a :class:`SearchSpec` into Tune's search space.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysl import stages
from raysl.config import Config, apply_overrides, get
from raysl.errors import ConfigError

SEARCHES = ("grid", "random", "optuna")
# Trials are ranked on the labeled validation split only; the test split is reported, never
# used to choose (Oliver et al. 2018: choosing on test overstates SSL gains).
METRICS = ("val_accuracy",)
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Param:
    """One searched key. ``grid``/``choice``: ``values`` are the options; ``uniform``,
    ``loguniform``: ``(low, high)``; ``randint``: ``(low, high)`` with ``high`` exclusive
    (Tune's convention); ``fixed``: one value, the same in every trial."""

    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def categorical(self) -> bool:
        return self.kind in ("grid", "choice", "fixed")


@dataclass(frozen=True)
class SearchSpec:
    """A parsed, validated space file."""

    search: str = "grid"
    num_samples: int = 1  # random/optuna: the number of trials; grid: repeats of the grid
    metric: str = "val_accuracy"
    params: tuple[Param, ...] = ()
    asha: Mapping[str, Any] | None = None  # ASHAScheduler kwargs (grace_period, ...) or None
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs fit
    seed: int | None = 0  # random/optuna sampling seed (None: unseeded)
    raw: Mapping[str, Any] = field(default_factory=dict)  # the file as read (for resume checks)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    @property
    def n_grid(self) -> int:
        """Trials in one pass of the grid (1 without grid keys)."""
        return math.prod(len(p.values) for p in self.params if p.kind == "grid")


def default_space(backends: Iterable[str]) -> dict[str, Any]:
    """Thresholds × every registered backend: the search `raysl tune` runs without --space."""
    return {
        "search": "grid",
        "num_samples": 1,
        "metric": "val_accuracy",
        "space": {
            "select.threshold": {"grid": list(DEFAULT_THRESHOLDS)},
            "backend.name": {"grid": list(backends)},
        },
    }


def _number(key: str, kind: str, v: Any) -> float:
    if isinstance(v, str):  # YAML 1.1 reads '1e-3' as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConfigError(f"space: {key}: {kind} bounds must be finite numbers, got {v!r}")
    return v


def _check_value(base: Config, key: str, value: Any, backends: Sequence[str] | None) -> Any:
    """The value as the config stores it (typed), or ConfigError naming the key."""
    try:
        cfg = apply_overrides(base, {key: value})
    except ConfigError as e:
        raise ConfigError(f"space: {e}") from None
    typed = get(cfg, key)
    if key == "backend.name" and backends is not None and typed not in backends:
        raise ConfigError(f"space: backend.name={typed!r}: unknown backend; allowed: "
                          f"{', '.join(backends)}")
    return typed


def _param(base: Config, key: str, spec: Any, backends: Sequence[str] | None) -> Param:
    if isinstance(spec, list):  # a bare list: a grid (no config key holds a list)
        spec = {"grid": spec}
    if not isinstance(spec, Mapping):  # a bare value: fixed in every trial
        return Param(key, "fixed", (_check_value(base, key, spec, backends),))
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"space: {key}: expected one of {{{', '.join(KINDS)}}}: ..., "
                          f"got {dict(spec)!r}")
    kind, vals = next(iter(spec.items()))
    if not isinstance(vals, list) or not vals:
        raise ConfigError(f"space: {key}: {kind} needs a non-empty list, got {vals!r}")
    if kind in ("grid", "choice"):
        typed = tuple(_check_value(base, key, v, backends) for v in vals)
        if len(set(map(repr, typed))) != len(typed):
            raise ConfigError(f"space: {key}: {kind} lists a value twice: {vals!r}")
        return Param(key, kind, typed)
    if len(vals) != 2:
        raise ConfigError(f"space: {key}: {kind} takes [low, high], got {vals!r}")
    lo, hi = (_number(key, kind, v) for v in vals)
    if not lo < hi:
        raise ConfigError(f"space: {key}: {kind} needs low < high, got {vals!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"space: {key}: loguniform needs low > 0, got {vals!r}")
    if kind == "randint":
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise ConfigError(f"space: {key}: randint bounds must be integers, got {vals!r}")
        lo, hi = int(lo), int(hi)
        _check_value(base, key, lo, backends)
        _check_value(base, key, hi - 1, backends)  # high is exclusive
        return Param(key, kind, (lo, hi))
    # the bounds must be valid values of the key (type and declared limits)
    lo_t, hi_t = _check_value(base, key, lo, backends), _check_value(base, key, hi, backends)
    if not isinstance(lo_t, float):
        raise ConfigError(f"space: {key}: {kind} needs a float key; {key} is "
                          f"{type(lo_t).__name__} (use randint or choice)")
    return Param(key, kind, (lo_t, hi_t))


_TOP = ("search", "num_samples", "metric", "asha", "max_concurrent_trials", "seed", "space")
_ASHA = ("grace_period", "reduction_factor", "brackets")


def parse_space(raw: Mapping[str, Any] | None, base: Config,
                backends: Sequence[str] | None = None) -> SearchSpec:
    """Validate a space file's content against ``base`` and return the spec.

    Every key must be a config key (as ``--set`` takes it) and every listed value or range
    bound a valid value of it; ``backends`` (the registry's names) checks ``backend.name``.
    Errors name the key and what is allowed, and are raised before Ray starts.

    Shorthand: a mapping of config keys only is the ``space`` section of a grid search
    (``{"select.threshold": [0.8, 0.9]}``), and a bare list is a grid (``{grid: [...]}``)."""
    raw = dict(raw or {})
    if raw and "space" not in raw and all("." in str(k) for k in raw):
        raw = {"space": raw}
    unknown = sorted(set(raw) - set(_TOP))
    if unknown:
        hint = (" (config keys go under 'space:', e.g. {'space': {'select.threshold': "
                "{'grid': [0.8, 0.9]}}})" if any("." in str(k) for k in unknown) else "")
        raise ConfigError(f"space file: unknown top-level key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(_TOP)}{hint}")
    search = raw.get("search", "grid")
    if search not in SEARCHES:
        raise ConfigError(f"space file: search={search!r}: must be one of {', '.join(SEARCHES)}")
    num_samples = raw.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"space file: num_samples={num_samples!r}: must be an integer >= 1")
    metric = raw.get("metric", "val_accuracy")
    if metric not in METRICS:
        raise ConfigError(f"space file: metric={metric!r}: must be one of {', '.join(METRICS)} "
                          "(trials are chosen on the validation split, never on test)")
    mct = raw.get("max_concurrent_trials", 0)
    if isinstance(mct, bool) or not isinstance(mct, int) or mct < 0:
        raise ConfigError(f"space file: max_concurrent_trials={mct!r}: must be an integer >= 0 "
                          "(0: as many as the CPUs fit)")
    seed = raw.get("seed", 0)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"space file: seed={seed!r}: must be an integer or null")
    asha = raw.get("asha")
    if asha is not None:
        if asha is True:
            asha = {}
        if not isinstance(asha, Mapping):
            raise ConfigError(f"space file: asha={asha!r}: expected a mapping, e.g. "
                              "{grace_period: 2}")
        bad = sorted(set(asha) - set(_ASHA))
        if bad:
            raise ConfigError(f"space file: asha: unknown key(s) {', '.join(bad)}; allowed: "
                              f"{', '.join(_ASHA)}")
        for k, v in asha.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 1:
                raise ConfigError(f"space file: asha.{k}={v!r}: must be a number >= 1")
        if "reduction_factor" in asha and asha["reduction_factor"] <= 1:
            raise ConfigError("space file: asha.reduction_factor must be > 1")
        asha = dict(asha)
    space = raw.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("space file: 'space' must map config keys to values, e.g. "
                          "select.threshold: {grid: [0.8, 0.9]}")
    params = tuple(_param(base, str(k), v, backends) for k, v in space.items())
    if search == "optuna" and not any(p.kind != "fixed" for p in params):
        raise ConfigError("space file: search=optuna needs at least one searched key")
    return SearchSpec(search, num_samples, metric, params, asha, mct, seed, raw)


def load_space(space: Mapping[str, Any] | str | Path | None, base: Config,
               backends: Sequence[str] | None = None) -> SearchSpec:
    """A space given as a dict (the YAML file's structure), a YAML file's path, or None
    (:func:`default_space` over ``backends``)."""
    if space is None:
        return parse_space(default_space(backends or ()), base, backends)
    if isinstance(space, Mapping):
        return parse_space(space, base, backends)
    p = Path(space)
    if not p.is_file():
        raise ConfigError(f"--space {str(p)!r}: file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--space {str(p)!r}: not valid YAML ({e})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"--space {str(p)!r}: expected a mapping with a 'space' key")
    return parse_space(raw, base, backends)


def n_trials(spec: SearchSpec) -> int:
    """How many trials the search runs."""
    return spec.n_grid * spec.num_samples if spec.search == "grid" else spec.num_samples


# -- prefit planning ------------------------------------------------------------------------

def _backend_variants(spec: SearchSpec, base: Config) -> list[Config]:
    """``base`` with each backend a trial may use (every listed value of a searched
    ``backend.name``, else the base's own)."""
    p = next((p for p in spec.params if p.key == "backend.name"), None)
    names = p.values if p is not None else (base.backend.name,)
    return [apply_overrides(base, {"backend.name": n}) for n in names]


def changes_a_fit(key: str, spec: SearchSpec, base: Config) -> bool:
    """True when ``key`` changes the baseline or the backend fit of some trial of ``spec``
    (:func:`raysl.stages.changes_upstream_of`). Keys that don't (``select.*``,
    ``train.lambda_u``, ``train.fixmatch_threshold``, resources ...) only change what the
    trials do with the shared fits."""
    return any(stages.changes_upstream_of(key, stage, c)
               for c in _backend_variants(spec, base) for stage in ("baseline", "backend"))


def upstream_identity(cfg: Config) -> str:
    """What a baseline and backend fit with ``cfg`` depend on (the data aside), as a key: two
    configs with the same identity share both fits."""
    return stages.cache_key(stages.config_part("baseline", cfg),
                            {k: get(cfg, k) for k in stages.closure("backend", cfg)})


def prefit_overrides(spec: SearchSpec, base: Config, limit: int = 256) -> list[dict[str, Any]]:
    """The distinct settings of the listed (grid, choice, fixed) keys that change a baseline
    or backend fit (:func:`changes_a_fit`), for fitting them once before the trials start;
    settings that lead to the same fits (e.g. ``backend.gmm.*`` values with ``backend.name=
    self``) are listed once, first one kept.

    Keys sampled from ranges can't be enumerated: a trial that draws a new upstream value fits
    it itself (and caches it). Returns ``[{}]`` when nothing upstream is searched; at most
    ``limit`` settings (the rest are fitted by the trials that need them)."""
    ups = [p for p in spec.params if p.categorical and changes_a_fit(p.key, spec, base)]
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for combo in itertools.product(*[p.values for p in ups]):
        ov = dict(zip([p.key for p in ups], combo, strict=True))
        ident = upstream_identity(apply_overrides(base, ov))
        if ident not in seen:
            seen.add(ident)
            out.append(ov)
            if len(out) >= limit:
                break
    return out
