"""``raysl tune``: a Ray Tune search over config keys, with shared fits and a report.

* :mod:`raysl.tuning.space`: the search space (parsing, validation, prefit planning), no Ray;
* :mod:`raysl.tuning.report`: ranking, the trials table, plots and ``report.md``, no Ray;
* :mod:`raysl.tuning.search`: the search on Ray Tune (:func:`tune`).

Importing this package does not import Ray: the search's names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysl._lazy import lazy_exports
from raysl.tuning.report import ReportInputs, TrialRecord, best, rank, write_report
from raysl.tuning.space import (
    Param,
    SearchSpec,
    default_space,
    load_space,
    parse_space,
    prefit_overrides,
)

if TYPE_CHECKING:
    from raysl.tuning.search import TuneOutcome, shared_dir, tune

_LAZY = {"tune": "raysl.tuning.search", "TuneOutcome": "raysl.tuning.search",
         "shared_dir": "raysl.tuning.search"}

__all__ = [
    "Param",
    "ReportInputs",
    "SearchSpec",
    "TrialRecord",
    "TuneOutcome",
    "best",
    "default_space",
    "load_space",
    "parse_space",
    "prefit_overrides",
    "rank",
    "shared_dir",
    "tune",
    "write_report",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
