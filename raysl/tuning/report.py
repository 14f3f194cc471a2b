"""The report of a ``raysl tune`` search, without Ray: the trials ranked on validation
accuracy, the table (terminal, CSV, Markdown), ``best.yaml``, the plots and ``report.md``.

:mod:`raysl.tuning.search` fills :class:`TrialRecord` from Tune's results. Plots are drawn
on matplotlib ``Figure`` objects with an Agg canvas: no pyplot state, no backend switch in the
caller's process.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysl.config import Config, dump_yaml
from raysl.io import write_text, write_with
from raysl.tuning.space import SearchSpec

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


def _figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure drawn by its own Agg canvas: no pyplot, no global backend switch,
    nothing left open (it is freed with the last reference)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(records: Sequence[TrialRecord], path: Path, n_val: int | None = None) -> Path:
    """Validation (solid) and test (dashed) accuracy of the final model vs threshold, one colour
    per backend."""
    fig = _figure((7.6, 4.2))
    ax = fig.subplots()
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
    return path


def plot_precision_coverage(records: Sequence[TrialRecord], path: Path) -> Path:
    """Pseudo-label precision (left) and coverage (right) vs threshold, per backend."""
    fig = _figure((9.6, 4.0))
    axes = fig.subplots(1, 2)
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
