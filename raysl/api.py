"""The Python front door: :func:`run`, :func:`tune`, :func:`load_model` and :class:`Result`.

Configs come as a :class:`~raysl.config.Config`, a dict of dotted (or nested) keys, or a YAML
path; keyword overrides use ``__`` for the dot (``select__threshold=0.9``). Data comes as a
dataset name, a file path, arrays ``(x, y)`` with ``-1`` for unlabeled rows, a pandas DataFrame
(label column ``y``) or a Ray Dataset (collected: the driver holds it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raysl.config import Config, apply_overrides, load_config
from raysl.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from raysl.data import Dataset

ConfigLike = Config | Mapping[str, Any] | str | Path | None


def make_config(config: ConfigLike = None, **overrides: Any) -> Config:
    """A validated :class:`Config` from a Config, a dict of dotted or nested keys, a YAML path
    or None (the defaults), then ``overrides`` (``train__epochs=10`` sets ``train.epochs``)."""
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    if config is None:
        return load_config(None, dotted)
    if isinstance(config, Config):
        return apply_overrides(config, dotted)
    if isinstance(config, str | Path):
        return load_config(config, dotted)
    if isinstance(config, Mapping):
        return apply_overrides(Config(), {**dict(config), **dotted})
    raise ConfigError(f"config: got {type(config).__name__}; expected a Config, a dict of "
                      "config keys, a YAML path or None")


def _frame_arrays(df: pd.DataFrame, label: str = "y") -> tuple[np.ndarray, np.ndarray]:
    if label not in df.columns:
        raise DataError(f"data: the DataFrame has no label column {label!r}; found "
                        f"{list(df.columns)[:10]}")
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    feats = [c for c in df.columns if c != label]
    bad = [c for c in feats if not is_numeric_dtype(df[c]) or is_bool_dtype(df[c])]
    if bad:
        raise DataError(f"data: feature columns must be numeric; {bad[:5]} are "
                        f"{[str(df[c].dtype) for c in bad[:5]]}")
    return df[feats].to_numpy(np.float32), df[label].to_numpy()


def in_memory_dataset(data: Any) -> Dataset:
    """``(x, y)`` arrays, a DataFrame or a Ray Dataset -> a Dataset (labels 0..C-1; the user's
    labels in ``classes``)."""
    from raysl.data import _from_arrays

    if type(data).__module__.startswith("ray.data"):
        data = data.to_pandas()
    if type(data).__module__.startswith("pandas"):
        x, y = _frame_arrays(data)
    elif isinstance(data, tuple) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
    else:
        raise DataError(f"data: got {type(data).__name__}; expected a dataset name or path, "
                        "(x, y) arrays, a pandas DataFrame or a Ray Dataset")
    return _from_arrays("data", x, y)


@dataclass(frozen=True)
class Result:
    """What :func:`run` returns; everything is also in ``out``.

    ``model`` takes raw inputs ``(n, ...)`` and returns logits ``(n, C)`` (its preprocessing is
    its first layer); ``classes[i]`` is the user's label of logit ``i`` (0..C-1 for named
    datasets). Text data: ``text`` is the encoder that made the model's input vectors
    (:mod:`raysl.text`), and :meth:`predict` / :meth:`predict_proba` also take raw strings."""

    metrics: dict[str, Any]
    model: torch.nn.Module
    out: Path
    classes: np.ndarray
    _pseudo: Path = field(repr=False, default=Path())
    text: Any = field(repr=False, default=None)

    @property
    def pseudo_labels(self) -> pd.DataFrame:
        """One row per unlabeled row: ``row`` (index into the training rows), ``label`` (the
        user's label), ``confidence``, ``backend``, ``selected``."""
        import pandas as pd

        df = pd.read_parquet(self._pseudo)
        df["label"] = self.classes[df["label"].to_numpy()]
        return df

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities ``(n, C)`` for raw rows ``x (n, ...)``, or for ``n`` strings
        when the run was on text."""
        from raysl.train import predict_proba

        if self.text is not None and len(x) and isinstance(x[0], str):
            from raysl.text import check_texts

            x = self.text(check_texts(x, "texts"))
        return predict_proba(self.model, np.asarray(x, np.float32))

    def predict(self, x: Any) -> np.ndarray:
        """The user's labels ``(n,)`` for raw rows ``x (n, ...)`` (or strings: text runs)."""
        return self.classes[self.predict_proba(x).argmax(1)]


def run(config: ConfigLike = None, *, data: Any = None, out: str | Path | None = None,
        **overrides: Any) -> Result:
    """Run the whole pipeline (baseline, pseudo-labels, joint training) and return its
    :class:`Result`.

    ``data``: a dataset name or path (sets ``data.dataset``), ``(x, y)`` arrays with ``-1``
    for unlabeled rows and any labels, a pandas DataFrame (label column ``y``), a Ray Dataset,
    or None (``data.dataset`` of the config). ``out``: the output directory (running again with
    it resumes); None makes a new temporary directory. Progress is logged on
    ``logging.getLogger("raysl")``; runs on Ray unless ``ray.enabled`` is false."""
    from raysl import pipeline

    dataset = None
    if isinstance(data, str | Path):
        overrides = {**overrides, "data__dataset": str(data)}
    elif data is not None:
        dataset = in_memory_dataset(data)
        overrides = {"data__dataset": "in-memory", **overrides}
    cfg = make_config(config, **overrides)
    # a user's files are read through Ray Data in the run's own Ray session (one per run)
    started = dataset is None and pipeline.start_ray_for_data(cfg)
    try:
        split = pipeline.check(cfg, dataset)
        out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="raysl-"))
        metrics = pipeline.run(cfg, out, split=split)
    finally:
        if started:
            import ray

            ray.shutdown()
    classes = split.classes if split.classes is not None else np.arange(split.n_classes)
    return Result(metrics, load_model(out / "model.pt"), out, classes,
                  out / "pseudo_labels.parquet", split.text)


def tune(config: ConfigLike = None, param_space: Mapping[str, Any] | str | Path | None = None,
         *, out: str | Path = "runs/tune", **overrides: Any) -> Any:
    """A Ray Tune search over config keys: ``param_space`` is a dict of dotted keys (as the
    space YAML file, e.g. ``{"select.threshold": [0.8, 0.9, 0.95]}``), a YAML path or None (the
    default space). Returns the search's outcome (best trial, best config, table); the report
    is written to ``out``."""
    from raysl.tuning import tune as _tune

    return _tune(make_config(config, **overrides), param_space, out)


def load_model(path: str | Path) -> torch.nn.Module:
    """Load a ``model.pt`` written by raysl, in eval mode (weights only: no code runs on load).
    The module takes raw inputs ``(n, ...)`` and returns logits ``(n, C)``."""
    from raysl.pipeline import load_model as _load

    return _load(path)
