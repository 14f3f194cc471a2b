"""``PseudoLabelClassifier``: the raysl pipeline as a scikit-learn estimator.

``fit(X, y)`` takes ``y = -1`` (or None / NaN) for unlabeled rows, like scikit-learn's
``SelfTrainingClassifier``, and any hashable labels otherwise. It runs the same pipeline as
``raysl run``: a baseline on the labeled rows, pseudo-labels from the backend(s), joint
training, and keeps the joint model only if it is not worse than the baseline on a validation
share of the labeled rows. In this process by default; on Ray with ``use_ray=True``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from raysl.config import Config, apply_overrides


class PseudoLabelClassifier(ClassifierMixin, BaseEstimator):
    """Semi-supervised classifier: pseudo-labels from a backend, then joint training.

    Parameters
    ----------
    backend : "auto", "self", "gmm", "vae" or "gan" (``backend.name``).
    threshold : keep pseudo-labels whose confidence exceeds this (``select.threshold``).
    lambda_u : weight of the pseudo-label losses; 0 is supervised training.
    epochs, min_steps, hidden, lr, batch_size, fixmatch : the classifier's training
        (``train.*``; ``hidden`` is the MLP's width).
    validation_fraction : share of each class's labeled rows held out to judge the
        pseudo-labels and to choose between the joint and the baseline model (a class with
        fewer than 2 labeled rows gives none).
    use_ray : run the stages on Ray (actors, Ray Train) instead of in this process.
    random_state : seed of the split, the backends and training.
    config : further config keys as a dict of dotted keys, e.g. ``{"backend.gmm.pca_dim": 8}``.

    Attributes
    ----------
    classes_ : (C,) the labels seen in ``y`` (unlabeled rows excluded).
    n_features_in_ : number of columns of ``X``.
    model_ : torch module, raw rows ``(n, d)`` -> logits ``(n, C)``.
    metrics_ : dict, the pipeline's metrics (``metrics.json`` of ``raysl run``).
    """

    def __init__(self, backend: str = "auto", threshold: float = 0.95, lambda_u: float = 1.0,
                 epochs: int = 30, min_steps: int = 500, hidden: int = 256, lr: float = 0.03,
                 batch_size: int = 32, fixmatch: bool = True, validation_fraction: float = 0.2,
                 use_ray: bool = False, random_state: int = 0,
                 config: Mapping[str, Any] | None = None) -> None:
        self.backend = backend
        self.threshold = threshold
        self.lambda_u = lambda_u
        self.epochs = epochs
        self.min_steps = min_steps
        self.hidden = hidden
        self.lr = lr
        self.batch_size = batch_size
        self.fixmatch = fixmatch
        self.validation_fraction = validation_fraction
        self.use_ray = use_ray
        self.random_state = random_state
        self.config = config

    def _config(self, n_shards: int) -> Config:
        keys: dict[str, Any] = {
            "backend.name": self.backend, "select.threshold": self.threshold,
            "train.lambda_u": self.lambda_u, "train.epochs": self.epochs,
            "train.min_steps": self.min_steps, "train.hidden": self.hidden,
            "train.lr": self.lr, "train.batch_size": self.batch_size,
            "train.fixmatch": self.fixmatch, "train.seed": self.random_state,
            "data.seed": self.random_state, "data.n_shards": n_shards,
            "data.dataset": "in-memory", "ray.enabled": self.use_ray,
        }
        return apply_overrides(Config(), {**keys, **dict(self.config or {})})

    def fit(self, X: Any, y: Any) -> PseudoLabelClassifier:
        """Fit on ``X (n, d)`` and ``y (n,)``, where -1 (or None / NaN) marks unlabeled rows."""
        from raysl import pipeline
        from raysl.data import Split, encode_labels
        from raysl.stages import cache_key

        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=False)
        codes, classes = encode_labels(y)
        check_classification_targets(y[codes >= 0])
        if len(classes) < 2:
            raise ValueError(f"{type(self).__name__} needs labeled rows of at least 2 classes; "
                             f"got {len(classes)} class(es)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction!r}: must be in "
                             "[0, 1)")
        x = np.asarray(X, np.float32)
        rng = np.random.default_rng(self.random_state)
        train_rows, val_rows = [], []
        for c in range(len(classes)):
            rows = rng.permutation(np.where(codes == c)[0])
            n_val = int(self.validation_fraction * len(rows)) if len(rows) >= 2 else 0
            val_rows.append(rows[:n_val])
            train_rows.append(rows[n_val:])
        idx_l, idx_v = np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(val_rows))
        idx_u = rng.permutation(np.where(codes < 0)[0])
        cfg = self._config(n_shards=int(min(2, max(1, len(idx_u)))))
        split = Split(x_l=x[idx_l], y_l=codes[idx_l], x_u=x[idx_u],
                      y_u=np.full(len(idx_u), -1, np.int64), x_val=x[idx_v], y_val=codes[idx_v],
                      x_test=x[:0], y_test=codes[:0], idx_l=idx_l, idx_u=idx_u,
                      n_classes=len(classes),
                      key=cache_key(x, codes, idx_l, idx_v, idx_u))
        split = pipeline.prepare(split, cfg)
        with tempfile.TemporaryDirectory(prefix="raysl-fit-") as out:
            metrics = pipeline.run(cfg, out, split=split)
            self.model_ = pipeline.load_model(f"{out}/model.pt")
        self.classes_ = classes
        self.metrics_ = metrics
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n, C)``, columns in the order of ``classes_``."""
        from raysl.train import predict_proba

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return predict_proba(self.model_, np.asarray(X, np.float32))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable label ``(n,)`` (values of ``classes_``)."""
        check_is_fitted(self)
        return self.classes_[self.predict_proba(X).argmax(1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags
