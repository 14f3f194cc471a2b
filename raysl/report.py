"""Search spaces and reports for ``raysl tune``, without Ray.

The Ray side (:mod:`raysl.distributed.tune`) turns a :class:`SearchSpec` into Tune's search
space and feeds trial records back here. Everything in this module is plain Python, numpy and
matplotlib, so it is unit-tested without starting Ray:

* :func:`parse_space` reads the space file (dotted config keys, as ``--set`` takes them) and
  validates every value with :func:`raysl.config.apply_overrides` before Ray starts;
* :func:`prefit_overrides` lists the distinct upstream settings (everything but ``select.*``)
  whose baseline and backend fits can be done once, before the trials;
* :func:`write_report` writes the trials table (CSV and Markdown), ``best.yaml``, the plots and
  ``report.md``.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysl.config import Config, apply_overrides, dump_yaml, get
from raysl.errors import ConfigError
from raysl.io import write_text, write_with

SEARCHES = ("grid", "random", "optuna")
# Trials are ranked on the labeled validation split only; the test split is reported, never
# used to choose (Oliver et al. 2018: choosing on test overstates SSL gains).
METRICS = ("val_accuracy",)
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95)
# Keys that only change which cached pseudo-labels are kept: they never need a new fit.
SELECTION_PREFIX = "select."


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
    Errors name the key and what is allowed, and are raised before Ray starts."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(_TOP))
    if unknown:
        raise ConfigError(f"space file: unknown top-level key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(_TOP)}")
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


def load_space(path: str | Path | None, base: Config,
               backends: Sequence[str] | None = None) -> SearchSpec:
    """The space file at ``path``, or :func:`default_space` over ``backends`` without one."""
    if path is None:
        return parse_space(default_space(backends or ()), base, backends)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space {str(p)!r}: file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--space {str(p)!r}: not valid YAML ({e})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"--space {str(p)!r}: expected a mapping with a 'space' key")
    return parse_space(raw, base, backends)


def prefit_overrides(spec: SearchSpec, limit: int = 256) -> list[dict[str, Any]]:
    """The distinct settings of the categorical keys that can change a baseline or backend fit
    (every key but ``select.*``), for fitting them once before the trials start.

    Keys sampled from ranges can't be enumerated: a trial that draws a new upstream value fits
    it itself (and caches it). Returns ``[{}]`` when nothing upstream is searched; at most
    ``limit`` settings (the rest are fitted by the trials that need them)."""
    ups = [p for p in spec.params if p.categorical and not p.key.startswith(SELECTION_PREFIX)]
    combos = itertools.product(*[p.values for p in ups])
    return [dict(zip([p.key for p in ups], c, strict=True))
            for c in itertools.islice(combos, limit)]


# -- the trials table -----------------------------------------------------------------------

@dataclass
class TrialRecord:
    """One trial as the report sees it (filled from Tune's results by the Ray side)."""

    trial_id: str
    config: dict[str, Any]  # the searched keys' values
    status: str  # "done", "stopped early", "error", "running", "pending"
    metrics: dict[str, Any] = field(default_factory=dict)  # last reported
    error: str = ""

    @property
    def complete(self) -> bool:
        """Ran to the end and reported the final model's metrics."""
        return self.status == "done" and self.metrics.get("final") is True


COLUMNS = (  # (metric name, header, kind)
    ("val_accuracy", "val acc", "pct"),
    ("test_accuracy", "test acc", "pct"),
    ("precision", "PL precision", "pct"),
    ("coverage", "PL coverage", "pct"),
    ("n_selected", "PL rows", "int"),
    ("epochs", "epochs", "int"),
    ("seconds", "wall s", "sec"),
)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def rank(records: Sequence[TrialRecord], metric: str = "val_accuracy") -> list[TrialRecord]:
    """Complete trials first, best ``metric`` (validation) first; ties keep trial order, so the
    choice is deterministic. Incomplete trials follow in trial order."""
    done = [r for r in records if r.complete and _finite(r.metrics.get(metric))]
    rest = [r for r in records if r not in done]
    done = sorted(done, key=lambda r: -float(r.metrics[metric]))  # stable
    return done + rest


def best(records: Sequence[TrialRecord], metric: str = "val_accuracy") -> TrialRecord | None:
    ranked = rank(records, metric)
    return ranked[0] if ranked and ranked[0].complete else None


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "int":
        return str(int(value))
    if kind == "sec":
        return f"{value:.0f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def table_rows(records: Sequence[TrialRecord], keys: Sequence[str],
               metric: str = "val_accuracy") -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows, ranked (see :func:`rank`); ``*`` marks the best trial."""
    top = best(records, metric)
    header = ["", "trial", *keys, *[h for _, h, _ in COLUMNS], "status"]
    rows = []
    for r in rank(records, metric):
        status = r.status if not r.error else f"{r.status}: {r.error.splitlines()[0][:60]}"
        rows.append(["*" if r is top else "", r.trial_id,
                     *[_fmt(r.config.get(k), "") for k in keys],
                     *[_fmt(r.metrics.get(m), kind) for m, _, kind in COLUMNS], status])
    return header, rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns for the terminal."""
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(f"{c:<{n}}" for c, n in zip(cells, w, strict=True))  # noqa: E731
    return "\n".join([line(header).rstrip(), "-" * (sum(w) + 2 * (len(w) - 1)),
                      *[line(r).rstrip() for r in rows]])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


CSV_METRICS = ("val_accuracy", "test_accuracy", "precision", "coverage", "n_selected",
               "argmax_accuracy", "baseline_val_accuracy", "baseline_test_accuracy", "epochs",
               "resumed_from_epoch", "backend_cached", "fit_seconds", "seconds")


def csv_text(records: Sequence[TrialRecord], keys: Sequence[str],
             metric: str = "val_accuracy") -> str:
    """Every trial, raw numbers (fractions, not percent), ranked like the printed table."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial_id", "status", *keys, *CSV_METRICS, "error"])
    for r in rank(records, metric):
        vals = [r.metrics.get(m) for m in CSV_METRICS]
        w.writerow([r.trial_id, r.status, *[r.config.get(k) for k in keys],
                    *["" if v is None else v for v in vals], r.error.splitlines()[0]
                    if r.error else ""])
    return buf.getvalue()


# -- plots ----------------------------------------------------------------------------------

def _by_backend_threshold(records: Sequence[TrialRecord], metric: str
                          ) -> dict[str, tuple[list[float], list[float]]]:
    """``backend -> (thresholds, mean metric)`` over complete trials, averaging over the other
    searched keys (lambda_u, ...) at each threshold."""
    acc: dict[str, dict[float, list[float]]] = {}
    for r in records:
        v = r.metrics.get(metric)
        if not r.complete or not _finite(v):
            continue
        b = str(r.metrics.get("backend", r.config.get("backend.name", "?")))
        t = float(r.metrics.get("threshold", r.config.get("select.threshold", math.nan)))
        if math.isfinite(t):
            acc.setdefault(b, {}).setdefault(t, []).append(float(v))
    return {b: (sorted(d), [sum(d[t]) / len(d[t]) for t in sorted(d)])
            for b, d in sorted(acc.items())}


def _colours(records: Sequence[TrialRecord]) -> dict[str, str]:
    """One colour per backend, the same in every plot."""
    names = {str(r.metrics.get("backend", r.config.get("backend.name", "?"))) for r in records}
    return {b: f"C{i}" for i, b in enumerate(sorted(names))}


def plot_accuracy(records: Sequence[TrialRecord], path: Path, n_val: int | None = None) -> Path:
    """Validation (solid) and test (dashed) accuracy of the final model vs threshold, one colour
    per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    val, test = (_by_backend_threshold(records, m) for m in ("val_accuracy", "test_accuracy"))
    colour = _colours(records)
    for b in sorted(set(val) | set(test)):
        c = colour[b]
        if b in val:
            ax.plot(*val[b], "o-", color=c, label=f"{b} validation")
        if b in test:
            ax.plot(*test[b], "s--", color=c, alpha=0.7, label=f"{b} test")
    ax.set_xlabel("select.threshold")
    ax.set_ylabel("accuracy of the joint model")
    others = {k for r in records for k in r.config} - {"backend.name", "select.threshold"}
    title = "Accuracy vs threshold" + (" (mean over other searched keys)" if others else "")
    if n_val:
        title += f"\nvalidation: {n_val} rows (steps of {100 / n_val:.1f}%)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.has_data():  # outside the axes: curves often crowd every corner
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path


def plot_precision_coverage(records: Sequence[TrialRecord], path: Path) -> Path:
    """Pseudo-label precision (left) and coverage (right) vs threshold, per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0))
    colour = _colours(records)
    for ax, m, label in zip(axes, ("precision", "coverage"),
                            ("precision of kept pseudo-labels", "coverage (kept / unlabeled)"),
                            strict=True):
        for b, (xs, ys) in _by_backend_threshold(records, m).items():
            ax.plot(xs, ys, "o-", color=colour[b], label=b)
        ax.set_xlabel("select.threshold")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle("Pseudo-labels vs threshold", fontsize=10)
    fig.tight_layout()
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path


# -- the report -----------------------------------------------------------------------------

@dataclass
class ReportInputs:
    """What :func:`write_report` needs besides the trial records."""

    spec: SearchSpec
    base: Config
    best_config: Config | None  # the best trial's full config
    replay_out: str  # a --out for replaying best.yaml that reuses the cached fits
    wall_seconds: float
    n_val: int | None = None
    n_test: int | None = None
    notes: list[str] = field(default_factory=list)


def write_report(out: Path, records: Sequence[TrialRecord], inp: ReportInputs) -> str:
    """Write trials.csv, trials.md, best.yaml, plots/*.png and report.md into ``out``; return
    the text table (for printing)."""
    keys, metric = inp.spec.keys, inp.spec.metric
    header, rows = table_rows(records, keys, metric)
    write_text(out / "trials.csv", csv_text(records, keys, metric))
    write_text(out / "trials.md", markdown_table(header, rows) + "\n")
    plots = out / "plots"
    plot_accuracy(records, plots / "accuracy_vs_threshold.png", inp.n_val)
    plot_precision_coverage(records, plots / "precision_coverage_vs_threshold.png")
    top = best(records, metric)
    if inp.best_config is not None:
        write_text(out / "best.yaml", "# best trial by validation accuracy: "
                   f"{top.trial_id if top else '?'}\n" + dump_yaml(inp.best_config))
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [
        "# raysl tune report", "",
        f"- search: **{inp.spec.search}** over {', '.join(f'`{k}`' for k in keys)}; "
        f"{len(records)} trial(s) ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})"
        + (f"; ASHA early stopping {dict(inp.spec.asha)}" if inp.spec.asha is not None else ""),
        f"- chosen by **{metric}** on the labeled validation split"
        + (f" ({inp.n_val} rows, so one row is {100 / inp.n_val:.1f}%)" if inp.n_val else "")
        + "; test accuracy"
        + (f" ({inp.n_test} rows)" if inp.n_test else "")
        + " is shown for reference and never used to choose",
        f"- wall time {inp.wall_seconds:.0f} s",
        *[f"- {n}" for n in inp.notes], "",
    ]
    if top is not None and inp.best_config is not None:
        diff = {k: top.config.get(k) for k in keys}
        lines += [
            "## Best trial", "",
            f"`{top.trial_id}`: " + ", ".join(f"`{k}={v}`" for k, v in diff.items()),
            f"— validation {_fmt(top.metrics.get('val_accuracy'), 'pct')}%, "
            f"test {_fmt(top.metrics.get('test_accuracy'), 'pct')}%, "
            f"pseudo-label precision {_fmt(top.metrics.get('precision'), 'pct')}% at "
            f"coverage {_fmt(top.metrics.get('coverage'), 'pct')}%.", "",
            "Its full config is [best.yaml](best.yaml). Replay it (reusing the cached baseline "
            "and backend fit; only the joint model is trained again):", "",
            "```sh", f"raysl run --config {out / 'best.yaml'} --out {inp.replay_out}", "```", "",
        ]
    else:
        lines += ["## Best trial", "", "No trial completed yet.", ""]
    lines += [
        "## Plots", "",
        "![accuracy vs threshold](plots/accuracy_vs_threshold.png)", "",
        "![precision and coverage vs threshold](plots/precision_coverage_vs_threshold.png)",
        "",
        "## All trials", "",
        "Accuracies, precision and coverage in %; `*` marks the best trial. Also as "
        "[trials.csv](trials.csv) (raw numbers) and [trials.md](trials.md).", "",
        markdown_table(header, rows), "",
    ]
    write_text(out / "report.md", "\n".join(lines))
    return text_table(header, rows)
