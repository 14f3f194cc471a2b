"""``gan``: a semi-supervised GAN (Salimans et al. 2016, "Improved techniques for training GANs").

The discriminator has K class logits l(x); the "fake" class has its logit fixed at 0, so
D(x) = Z/(Z+1) with Z = Σ_k exp l_k(x). Its loss per step:

    CE(l(x_l), y_l)  -  mean log D(x_u)  -  mean log(1 - D(G(z)))
  = CE + mean[-lse(x_u) + softplus(lse(x_u))] + mean[softplus(lse(G(z)))],   lse = logsumexp l

The generator matches the mean of the discriminator's last hidden features on real and
generated rows (feature matching). The K-class softmax of l(x) gives the probabilities.
Fitted by FedAvg rounds (:mod:`raysl.backends.fedavg`).

``backend.gan.features`` says what x is: the inputs ("inputs") or the baseline classifier's
penultimate-layer embedding ("embedding", standardized; the networks are then MLPs over
vectors), computed by each shard worker on its own rows as the GMM's is
(:class:`raysl.backends.nets.ClassifierEmbedding`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysl.backends.base import FitContext
from raysl.backends.fedavg import FedAvgBackend, make_fedavg
from raysl.backends.nets import body
from raysl.config import GANConfig


def discriminator_loss(logits_l: Tensor, y_l: Tensor, logits_u: Tensor,
                       logits_f: Tensor) -> Tensor:
    """Salimans et al.'s K+1-class loss from class logits (n, K) of labeled, unlabeled and
    generated rows (the module docstring)."""
    lse_u = torch.logsumexp(logits_u, 1)
    lse_f = torch.logsumexp(logits_f, 1)
    unsup = (-lse_u + F.softplus(lse_u)).mean() + F.softplus(lse_f).mean()
    return F.cross_entropy(logits_l, y_l) + unsup


def feature_matching_loss(f_real: Tensor, f_fake: Tensor) -> Tensor:
    """‖mean f(x) - mean f(G(z))‖², features (n, h)."""
    return (f_real.mean(0) - f_fake.mean(0)).pow(2).sum()


class Generator(nn.Module):
    """z (n, noise_dim) -> rows of ``input_shape``: sigmoid pixels for images, linear values
    for vectors. Batch norm is fine here: the generator never labels a row."""

    def __init__(self, input_shape: tuple[int, ...], noise_dim: int, hidden: int) -> None:
        super().__init__()
        self.shape = input_shape
        self.image = len(input_shape) == 3
        self.net = nn.Sequential(
            nn.Linear(noise_dim, hidden), nn.BatchNorm1d(hidden), nn.Softplus(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.Softplus(),
            nn.Linear(hidden, math.prod(input_shape)),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.net(z)
        return (torch.sigmoid(out) if self.image else out).view(len(z), *self.shape)


class Discriminator(nn.Module):
    """Rows (n, ...) -> (features (n, h), class logits (n, K)); Gaussian noise and dropout in
    training mode (as in the paper) keep it from overfitting the few labels."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, hidden: int) -> None:
        super().__init__()
        self.features, width = body(input_shape, hidden, noise=0.3, hidden_noise=0.5,
                                    dropout=0.5)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.head(f)


class SSGAN(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], n_classes: int, cfg: GANConfig) -> None:
        super().__init__()
        self.gen = Generator(input_shape, cfg.noise_dim, cfg.hidden)
        self.disc = Discriminator(input_shape, n_classes, cfg.hidden)


class GANTrainer:
    """The :class:`~raysl.backends.fedavg.LocalTrainer` of the semi-supervised GAN."""

    def __init__(self, cfg: GANConfig, ctx: FitContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    def build(self) -> SSGAN:
        return SSGAN(self.ctx.input_shape, self.ctx.n_classes, self.cfg)

    def optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        assert isinstance(model, SSGAN)
        betas = (0.5, 0.999)  # the usual GAN setting
        return [torch.optim.Adam(model.disc.parameters(), lr=self.cfg.lr, betas=betas),
                torch.optim.Adam(model.gen.parameters(), lr=self.cfg.lr, betas=betas)]

    def _noise(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.rand((n, self.cfg.noise_dim), generator=gen)  # uniform, as in the paper

    def step(self, model: nn.Module, opts: list[torch.optim.Optimizer], x_u: Tensor,
             x_l: Tensor, y_l: Tensor, gen: torch.Generator) -> float:
        assert isinstance(model, SSGAN)
        opt_d, opt_g = opts
        # discriminator: generated rows detached (the generator is updated below)
        fake = model.gen(self._noise(len(x_u), gen)).detach()
        feats, logits = model.disc(torch.cat([x_l, x_u, fake]))
        n_l, n_u = len(x_l), len(x_u)
        f_real = feats[n_l:n_l + n_u].detach()  # the feature-matching target, reused below
        loss_d = discriminator_loss(logits[:n_l], y_l, logits[n_l:n_l + n_u],
                                    logits[n_l + n_u:])
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator: feature matching against the real unlabeled rows
        f_fake, _ = model.disc(model.gen(self._noise(len(x_u), gen)))
        loss_g = feature_matching_loss(f_real, f_fake)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        return float(loss_d.detach())

    def class_logits(self, model: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(model, SSGAN)
        return model.disc(x)[1]


def make_gan(cfg: GANConfig, ctx: FitContext) -> FedAvgBackend:
    """The ``gan`` backend: :class:`GANTrainer` under FedAvg, on the inputs or the
    baseline classifier's embedding (``backend.gan.features``)."""
    return make_fedavg(GANTrainer, cfg, ctx, "backend.gan.features")
