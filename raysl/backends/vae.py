"""``vae``: a semi-supervised VAE (Kingma et al. 2014, "M2", optionally stacked on "M1").

M2 has a classifier q(y|x), an encoder q(z|x,y) and a decoder p(x|y,z) with p(y) uniform and
p(z) = N(0, I). Its loss per row (lower is better):

- labeled (x, y):   -L(x, y) + alpha · (-log q(y|x))
  with -L(x, y) = -log p(x|y,z) + KL(q(z|x,y) ‖ p(z)) - log p(y), one z sample;
- unlabeled x:      Σ_y q(y|x) · (-L(x, y)) - H(q(y|x)).

With ``m1_dim > 0``, M2 is stacked on M1 (a plain VAE on the inputs, trained at the same time
on every row): M2 models samples of M1's latent z₁ (Gaussian likelihood) and labels rows from
M1's posterior mean; M2's gradient does not reach M1 (stop-gradient), so M1 stays an
unsupervised feature learner as in the paper. Without M1, images use a Bernoulli likelihood
(pixels in [0, 1]) and vectors a Gaussian one.

q(y|x) gives the class probabilities. Fitted by FedAvg rounds (:mod:`raysl.backends.fedavg`).

``backend.vae.features`` says what x is: the inputs ("inputs") or the baseline classifier's
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
from raysl.backends.nets import body, mlp
from raysl.config import VAEConfig


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, e^logvar) ‖ N(0, I)) per row: (n, d) -> (n,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def reparameterize(mu: Tensor, logvar: Tensor, gen: torch.Generator) -> Tensor:
    """One sample of N(mu, e^logvar), (n, d), with noise from ``gen``."""
    eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


class VAE(nn.Module):
    """M1: x (n, ...) -> q(z₁|x) = N(mu, e^logvar) (n, d₁); p(x|z₁) Bernoulli or Gaussian."""

    def __init__(self, input_shape: tuple[int, ...], latent: int, hidden: int) -> None:
        super().__init__()
        self.bernoulli = len(input_shape) == 3
        self.dim = math.prod(input_shape)
        self.enc, width = body(input_shape, hidden)
        self.to_latent = nn.Linear(width, 2 * latent)
        self.dec = mlp(latent, hidden, self.dim)
        self.x_logvar = nn.Parameter(torch.zeros(self.dim))  # used by the Gaussian case only

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.to_latent(self.enc(x)).chunk(2, 1)
        return mu, logvar.clamp(-8.0, 8.0)

    def loss(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Negative ELBO per row, (n,)."""
        mu, logvar = self.encode(x)
        return nll(self.dec(reparameterize(mu, logvar, gen)), x.flatten(1), self.bernoulli,
                   self.x_logvar) + gaussian_kl(mu, logvar)


def nll(out: Tensor, x: Tensor, bernoulli: bool, logvar: Tensor) -> Tensor:
    """-log p(x | decoder output) per row for flat x (n, D): Bernoulli logits (continuous
    targets in [0, 1], as usual for MNIST) or a Gaussian with per-dimension log-variance."""
    if bernoulli:
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
    lv = logvar.clamp(-6.0, 6.0)
    return 0.5 * ((x - out).pow(2) / lv.exp() + lv + math.log(2 * math.pi)).sum(1)


class M2(nn.Module):
    """q(y|x), q(z|x,y), p(x|y,z) over rows of ``input_shape``."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, latent: int,
                 hidden: int) -> None:
        super().__init__()
        self.k = n_classes
        self.bernoulli = len(input_shape) == 3
        self.dim = math.prod(input_shape)
        self.cls_body, width = body(input_shape, hidden)
        self.cls_head = nn.Linear(width, n_classes)
        self.enc_body, width = body(input_shape, hidden)
        self.enc_head = mlp(width + n_classes, hidden, 2 * latent)
        self.dec = mlp(latent + n_classes, hidden, self.dim)
        self.x_logvar = nn.Parameter(torch.zeros(self.dim))  # Gaussian likelihood only

    def class_logits(self, x: Tensor) -> Tensor:
        return self.cls_head(self.cls_body(x))  # (n, C)

    def neg_elbo(self, x: Tensor, h: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """-L(x, y) per row, (n,), for x (n, ...), its encoder features ``h = enc_body(x)``
        (n, width) (computed once for all classes) and integer labels y (n,)."""
        onehot = F.one_hot(y, self.k).to(x.dtype)
        mu, logvar = self.enc_head(torch.cat([h, onehot], 1)).chunk(2, 1)
        logvar = logvar.clamp(-8.0, 8.0)
        z = reparameterize(mu, logvar, gen)
        out = self.dec(torch.cat([z, onehot], 1))
        return (nll(out, x.flatten(1), self.bernoulli, self.x_logvar) + gaussian_kl(mu, logvar)
                + math.log(self.k))  # -log p(y), p(y) uniform

    def loss(self, x_u: Tensor, x_l: Tensor, y_l: Tensor, alpha: float,
             gen: torch.Generator) -> Tensor:
        """Mean labeled + mean unlabeled loss (the module docstring's J^alpha)."""
        n, k = len(x_u), self.k
        # every unlabeled row with every class: rows repeated class-major, (k·n, ...)
        ys = torch.arange(k).repeat_interleave(n)
        h_u = self.enc_body(x_u).repeat(k, 1)
        l_all = self.neg_elbo(x_u.repeat(k, *([1] * (x_u.dim() - 1))), h_u, ys,
                              gen).view(k, n).T
        logq = F.log_softmax(self.class_logits(x_u), 1)  # (n, k)
        q = logq.exp()
        unlabeled = (q * (l_all + logq)).sum(1).mean()  # E_q[-L] - H(q)
        labeled = self.neg_elbo(x_l, self.enc_body(x_l), y_l, gen).mean()
        ce = F.cross_entropy(self.class_logits(x_l), y_l)
        return unlabeled + labeled + alpha * ce


class SSVAE(nn.Module):
    """M2, on the inputs or stacked on an M1 VAE's latent space."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.m1 = VAE(input_shape, cfg.m1_dim, cfg.hidden) if cfg.m1_dim > 0 else None
        m2_shape = (cfg.m1_dim,) if self.m1 is not None else input_shape
        self.m2 = M2(m2_shape, n_classes, cfg.latent_dim, cfg.hidden)


class VAETrainer:
    """The :class:`~raysl.backends.fedavg.LocalTrainer` of the semi-supervised VAE."""

    def __init__(self, cfg: VAEConfig, ctx: FitContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    def build(self) -> SSVAE:
        return SSVAE(self.ctx.input_shape, self.ctx.n_classes, self.cfg)

    def optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(model.parameters(), lr=self.cfg.lr)]

    def step(self, model: nn.Module, opts: list[torch.optim.Optimizer], x_u: Tensor,
             x_l: Tensor, y_l: Tensor, gen: torch.Generator) -> float:
        assert isinstance(model, SSVAE)
        loss = torch.zeros(())
        if model.m1 is not None:
            x = torch.cat([x_u, x_l])
            loss = model.m1.loss(x, gen).mean()
            with torch.no_grad():  # M2 sees samples of z₁ (stop-gradient into M1)
                z1 = reparameterize(*model.m1.encode(x), gen)
            x_u, x_l = z1[: len(x_u)], z1[len(x_u):]
        loss = loss + model.m2.loss(x_u, x_l, y_l, self.cfg.alpha, gen)
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        opts[0].step()
        return float(loss.detach())

    def class_logits(self, model: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(model, SSVAE)
        if model.m1 is not None:
            x = model.m1.encode(x)[0]  # the posterior mean of z₁
        return model.m2.class_logits(x)


def make_vae(cfg: VAEConfig, ctx: FitContext) -> FedAvgBackend:
    """The ``vae`` backend: :class:`VAETrainer` under FedAvg, on the inputs or the
    baseline classifier's embedding (``backend.vae.features``)."""
    return make_fedavg(VAETrainer, cfg, ctx, "backend.vae.features")
