"""raysl: semi-supervised learning with pseudo-labels, on Ray.

>>> import raysl
>>> result = raysl.run(data="digits", train__epochs=10)    # doctest: +SKIP
>>> clf = raysl.PseudoLabelClassifier().fit(X, y)          # y = -1: unlabeled  # doctest: +SKIP

Importing raysl is cheap and has no side effects: each name below is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysl._lazy import lazy_exports

if TYPE_CHECKING:
    from raysl.api import Result, load_model, make_config, run, tune
    from raysl.config import Config
    from raysl.errors import ConfigError, DataError, RayslError
    from raysl.estimator import PseudoLabelClassifier

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "run": "raysl.api",
    "tune": "raysl.api",
    "load_model": "raysl.api",
    "make_config": "raysl.api",
    "Result": "raysl.api",
    "PseudoLabelClassifier": "raysl.estimator",
    "Config": "raysl.config",
    "RayslError": "raysl.errors",
    "ConfigError": "raysl.errors",
    "DataError": "raysl.errors",
}

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "PseudoLabelClassifier",
    "RayslError",
    "Result",
    "__version__",
    "load_model",
    "make_config",
    "run",
    "tune",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
