"""Small building blocks the backends share: a feature body chosen from the data's shape (conv
for ``(c, h, w)`` images, MLP for ``(d,)`` vectors), as :mod:`raysl.models` does; and the
baseline classifier's embedding as a feature space (:class:`ClassifierEmbedding`).

No batch norm in anything that labels rows: a row's class probabilities must not depend on
which other rows share its batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from raysl.backends.base import FitContext


class GaussianNoise(nn.Module):
    """Adds N(0, std²) noise in training mode only (Salimans et al.'s discriminator)."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.std == 0:
            return x
        return x + self.std * torch.randn_like(x)


def body(input_shape: tuple[int, ...], hidden: int, noise: float = 0.0,
         hidden_noise: float = 0.0, dropout: float = 0.0) -> tuple[nn.Module, int]:
    """A feature extractor for rows of ``input_shape`` and its output width.

    Images (c, h, w): two stride-2 convolutions then a dense layer; vectors (d,): two dense
    layers. ``noise`` (Gaussian std on the inputs), ``hidden_noise`` (on hidden layers) and
    ``dropout`` regularise a discriminator."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        convs = nn.Sequential(
            GaussianNoise(noise),
            nn.Conv2d(c, 32, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            GaussianNoise(hidden_noise),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            nn.Flatten(), GaussianNoise(hidden_noise),
        )
        flat = 64 * math.ceil(math.ceil(h / 2) / 2) * math.ceil(math.ceil(w / 2) / 2)
        return nn.Sequential(convs, nn.Linear(flat, hidden), nn.LeakyReLU(0.2)), hidden
    if len(input_shape) == 1:
        (d,) = input_shape
        return nn.Sequential(
            GaussianNoise(noise), nn.Linear(d, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            GaussianNoise(hidden_noise), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
        ), hidden
    raise ValueError(f"input_shape={input_shape}: expected (c, h, w) or (d,)")


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """d_in -> hidden -> hidden -> d_out."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, d_out))


class ClassifierEmbedding:
    """The baseline classifier's penultimate layer (``FitContext.classifier_state``) as a
    feature map: the feature space of a backend with ``features="embedding"`` (gmm, vae, gan).

    A row's embedding is a function of the row alone, bit for bit (:func:`raysl.train.embed`),
    so a fit over shards stays independent of the sharding. Arrays embedded with ``keep=True``
    (a shard worker's own rows and the labeled set, which it embeds every round) are computed
    once and kept, keyed by identity: they don't depend on the backend's state."""

    def __init__(self, ctx: FitContext, key: str) -> None:
        if ctx.classifier_state is None:
            raise ValueError(f"{key}='embedding' needs the baseline classifier "
                             "(FitContext.classifier_state)")
        from raysl.models import build_model  # lazy: only a backend in the embedding needs it
        from raysl.train import embed, state_from_numpy

        self._embed = embed
        self.net = build_model(ctx.input_shape, ctx.n_classes, ctx.hidden)
        self.net.load_state_dict(state_from_numpy(ctx.classifier_state))
        self.net.eval()
        self.width = int(embed(self.net, np.zeros((0, *ctx.input_shape), np.float32)).shape[1])
        self._kept: list[tuple[np.ndarray, np.ndarray]] = []  # (array, its embedding)

    def __call__(self, x: np.ndarray, keep: bool = False) -> np.ndarray:
        """Rows ``x`` (n, ...) -> their embedding (n, width), float64."""
        for arr, emb in self._kept:
            if arr is x:
                return emb
        emb = self._embed(self.net, x)
        if keep:
            self._kept = [*self._kept[-3:], (x, emb)]  # a shard's rows and the labeled set
        return emb


def classifier_embedding(features: str, ctx: FitContext, key: str,
                         plain: str) -> ClassifierEmbedding | None:
    """The feature map a backend config's ``features`` value names: None for ``plain`` (the
    inputs themselves), the classifier's embedding for ``"embedding"``."""
    if features == "embedding":
        return ClassifierEmbedding(ctx, key)
    if features != plain:
        raise ValueError(f"{key}={features!r}: expected {plain!r} or 'embedding'")
    return None
