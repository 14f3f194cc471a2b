"""``self``: the initial classifier's own probabilities (classic pseudo-labelling).

There is nothing to fit: the classifier was trained on the labeled rows in step 1 and arrives
in ``FitContext.classifier_state``; each shard worker predicts its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from raysl.backends.base import FitContext, Shard
from raysl.models import build_model
from raysl.train import predict_proba, state_from_numpy


class SelfTrainingBackend:
    def __init__(self, ctx: FitContext) -> None:
        if ctx.classifier_state is None:
            raise ValueError("backend.name='self' needs the initial classifier "
                             "(FitContext.classifier_state)")
        torch.set_num_threads(1)  # one thread per shard actor; actors run side by side
        self.model = build_model(ctx.input_shape, ctx.n_classes, ctx.hidden)
        self.model.load_state_dict(state_from_numpy(ctx.classifier_state))

    def init(self, x_l: np.ndarray, y_l: np.ndarray) -> None:
        pass

    @property
    def converged(self) -> bool:
        return True

    def shard_stats(self, shard: Shard) -> Any:  # pragma: no cover - never called (converged)
        return None

    def merge(self, stats: Sequence[Any]) -> float:  # pragma: no cover
        return 0.0

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, x)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
