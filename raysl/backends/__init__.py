"""Pseudo-label backends behind one Protocol (:class:`~raysl.backends.base.Backend`), in an
explicit registry: a new backend is a class and one line here."""

from __future__ import annotations

from raysl.backends.base import Backend, BackendFactory, FitContext
from raysl.backends.gan import make_gan
from raysl.backends.gmm import GMMBackend
from raysl.backends.self_training import SelfTrainingBackend
from raysl.backends.vae import make_vae
from raysl.calibration import FLOOR, GMM_FLOORS, SOFTMAX_FLOOR
from raysl.config import BackendConfig


def _gmm(cfg: BackendConfig, ctx: FitContext) -> Backend:
    return GMMBackend(cfg.gmm, ctx)


def _self(cfg: BackendConfig, ctx: FitContext) -> Backend:
    return SelfTrainingBackend(ctx)


def _vae(cfg: BackendConfig, ctx: FitContext) -> Backend:
    return make_vae(cfg.vae, ctx)


def _gan(cfg: BackendConfig, ctx: FitContext) -> Backend:
    return make_gan(cfg.gan, ctx)


BACKENDS: dict[str, BackendFactory] = {
    "gmm": _gmm,
    "self": _self,
    "vae": _vae,
    "gan": _gan,
}


# The floor under log p when a backend's probabilities are temperature-scaled
# (raysl.calibration): a network's softmax keeps its logit gaps down to 1e-30; the GMM's
# log-density ratios are clipped at the one of GMM_FLOORS its validation rows favour; a backend
# not listed at 1e-12 (calibration_floor).
CALIBRATION_FLOOR: dict[str, float | tuple[float, ...]] = {
    "gmm": GMM_FLOORS,
    "self": SOFTMAX_FLOOR,
    "vae": SOFTMAX_FLOOR,
    "gan": SOFTMAX_FLOOR,
}


def calibration_floor(name: str) -> float | tuple[float, ...]:
    """The floor under log p for backend ``name``'s temperature scaling, or the candidates
    :func:`raysl.calibration.calibrate` chooses it from."""
    return CALIBRATION_FLOOR.get(name, FLOOR)


# backend.name=auto fits these (cheap: no neural network to train beyond the baseline) and
# keeps the one with the best validation accuracy; ties go to the earlier name.
AUTO_BACKENDS: tuple[str, ...] = ("self", "gmm")


def needs_classifier(cfg: BackendConfig) -> bool:
    """True when the backend reads the baseline classifier (``FitContext.classifier_state``):
    ``self``, and ``gmm``, ``vae`` or ``gan`` in the classifier's embedding
    (``backend.<name>.features=embedding``, :class:`~raysl.backends.nets.ClassifierEmbedding`).
    Its fit then depends on the baseline, and its cache key holds the baseline's weights."""
    return cfg.name == "self" or cfg.in_embedding


def backend_section(cfg: BackendConfig) -> object:
    """The part of the backend config that changes the fit (its cache key)."""
    return getattr(cfg, cfg.name, None)


__all__ = ["AUTO_BACKENDS", "BACKENDS", "CALIBRATION_FLOOR", "Backend", "FitContext",
           "backend_section", "calibration_floor", "needs_classifier"]
