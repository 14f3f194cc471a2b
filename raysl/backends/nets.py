"""Small building blocks the neural backends share: a feature body chosen from the data's shape
(conv for ``(c, h, w)`` images, MLP for ``(d,)`` vectors), as :mod:`raysl.models` does.

No batch norm in anything that labels rows: a row's class probabilities must not depend on
which other rows share its batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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
