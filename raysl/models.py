"""Classifiers, chosen from the data's shape: a small CNN for images, an MLP for vectors.

No batch norm: a model's output for a row must not depend on which other rows share its batch
(DDP workers see different batches, and ``lambda_u = 0`` must equal supervised training).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """(n, c, h, w) images -> (n, n_classes) logits; works from 8×8 (digits) to 32×32."""

    def __init__(self, in_channels: int, n_classes: int, hidden: int = 256, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # (n, 2w, 4, 4) whatever the input size
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * 16, hidden), nn.ReLU(), nn.Dropout(0.25),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        # channels-last convolutions: fwd+bwd of a 128-image MNIST batch on one CPU thread
        # 0.54 s instead of 0.73 s (oneDNN's preferred layout); the weights are stored so too
        return self.head(self.features(x.contiguous(memory_format=torch.channels_last)))

    def embed(self, x: Tensor) -> Tensor:
        """The penultimate layer: (n, c, h, w) -> (n, hidden), the input of the last linear
        layer (after its ReLU; dropout is the identity in eval mode)."""
        return self.head[:-1](self.features(x.contiguous(memory_format=torch.channels_last)))


class MLP(nn.Module):
    """(n, d) vectors -> (n, n_classes) logits."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def embed(self, x: Tensor) -> Tensor:
        """The penultimate layer: (n, d) -> (n, hidden), the input of the last linear layer."""
        return self.net[:-1](x)


class Linear(nn.Module):
    """(n, d) vectors -> (n, n_classes) logits by one linear layer: multinomial logistic
    regression (``train.hidden = 0``), for features that are already a learned representation
    (a pretrained text encoder's vectors), where 100 labels are too few to fit an MLP on."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.net = nn.Linear(in_features, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def embed(self, x: Tensor) -> Tensor:
        """The input of the last linear layer: the features themselves, (n, d)."""
        return x


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal weights for the ReLU layers and zero biases, in place.

    PyTorch's default (``kaiming_uniform_(a=sqrt(5))``) scales each layer's output variance by
    about 1/3; through six ReLU layers without batch norm the logits start tiny and training
    sits at chance for hundreds of steps (seen on mnist5k with augmentation). He init keeps
    the variance, so the network learns from the first steps."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def build_model(input_shape: tuple[int, ...], n_classes: int, hidden: int = 256,
                init: str = "torch") -> nn.Module:
    """A CNN for ``(c, h, w)`` inputs, an MLP for ``(d,)`` inputs (``hidden`` 0: one linear
    layer). ``init``: "torch" (the layers' defaults) or "he" (:func:`he_init`)."""
    hidden = 256 if hidden < 0 else hidden  # -1: train.hidden's "by the data" (the pipeline
    # resolves it; a caller without the data gets the width of images and plain vectors)
    if len(input_shape) == 3:
        if hidden == 0:
            raise ValueError("train.hidden=0 (a linear classifier) takes vectors, not images")
        model: nn.Module = SmallCNN(input_shape[0], n_classes, hidden)
    elif len(input_shape) == 1:
        model = (MLP(input_shape[0], n_classes, hidden) if hidden > 0
                 else Linear(input_shape[0], n_classes))
    else:
        raise ValueError(f"input_shape={input_shape}: expected (c, h, w) or (d,)")
    if init == "he":
        he_init(model)
    elif init != "torch":
        raise ValueError(f"init={init!r}: expected 'torch' or 'he'")
    if isinstance(model, SmallCNN):
        model = model.to(memory_format=torch.channels_last)
    return model


class Standardize(nn.Module):
    """The saved transform as the model's first layer: (n, d) raw -> (n, d) standardized."""

    def __init__(self, mean: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("scale", scale.float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.scale
