"""Weak and strong augmentations of image batches (FixMatch), on batched tensors.

Both work on a whole batch ``x`` (n, c, h, w) in [0, 1] at once, with a different random
draw for every row, from an explicit ``torch.Generator`` (so a redone epoch sees the same
augmentations). torchvision's ``transforms.v2`` classes draw *one* parameter set per call, so
``v2.RandomRotation(30)(batch)`` rotates every row by the same angle (checked with torchvision
0.29); per-row randomness therefore comes from batched torch ops (one ``affine_grid`` /
``grid_sample`` for all geometric ops), and ``transforms.v2.functional`` supplies the
parameter-free per-image ops (autocontrast, equalize, the blurred image behind sharpness),
which do work per image on a batch.

- weak: a random translation by up to 12.5% of the side (no flips: digits are not symmetric);
- strong: RandAugment with random magnitudes (FixMatch's RA variant): 2 ops per row out of
  :data:`STRONG_OPS`, then cutout of a square of up to half the side.

Feature vectors (n, d), standardized (:mod:`raysl.preprocess`), get VIME-style views (Yoon et
al. 2020): weak = small Gaussian noise; strong = each entry replaced, with probability
``mask_p``, by the same column of another row of the batch (a draw from the column's marginal
that keeps its type and range), then larger noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Geometric ops compose into one affine matrix per row; the others blend per row.
STRONG_OPS = ("identity", "autocontrast", "brightness", "contrast", "equalize", "posterize",
              "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x",
              "translate_y")
_GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def translate(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Shift row i of ``x`` (n, c, h, w) by integer ``(dx[i], dy[i])`` pixels, zero fill."""
    n, c, h, w = x.shape
    p = int(max(dx.abs().max().item(), dy.abs().max().item(), 0))
    if p == 0:
        return x
    xp = torch.nn.functional.pad(x, (p, p, p, p))  # (n, c, h + 2p, w + 2p)
    rows = (p - dy)[:, None] + torch.arange(h)  # (n, h): source row of each output row
    cols = (p - dx)[:, None] + torch.arange(w)  # (n, w)
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


def weak_vector(x: Tensor, gen: torch.Generator, noise: float = 0.1) -> Tensor:
    """(n, d) standardized vectors plus N(0, ``noise``²) per entry."""
    return x + noise * torch.randn(x.shape, generator=gen)


def strong_vector(x: Tensor, gen: torch.Generator, mask_p: float = 0.3,
                  noise: float = 0.2) -> Tensor:
    """VIME's mask-and-replace corruption of (n, d) vectors, then N(0, ``noise``²).

    Entry (i, j) is replaced with probability ``mask_p`` by x[π_j(i), j], π_j a random
    permutation of the batch per column."""
    n, d = x.shape
    perm = torch.argsort(torch.rand(n, d, generator=gen), dim=0)  # (n, d) a permutation/column
    shuffled = torch.gather(x, 0, perm)
    mask = torch.rand(n, d, generator=gen) < mask_p
    return torch.where(mask, shuffled, x) + noise * torch.randn(x.shape, generator=gen)


def weak(x: Tensor, gen: torch.Generator, max_shift: float = 0.125) -> Tensor:
    """Images (n, c, h, w): a random integer translation of every row by up to ``max_shift`` ×
    side (at least 1 px). Vectors (n, d): :func:`weak_vector`."""
    if x.dim() == 2:
        return weak_vector(x, gen)
    if x.dim() != 4:
        return x
    n, _, h, w = x.shape
    s = max(1, int(max_shift * min(h, w)))
    d = torch.randint(-s, s + 1, (2, n), generator=gen)
    return translate(x, d[0], d[1])


def cutout(x: Tensor, gen: torch.Generator, max_frac: float = 0.5, fill: float = 0.5) -> Tensor:
    """Fill a random square of side up to ``max_frac`` × side in every row with ``fill``."""
    n, _, h, w = x.shape
    size = (torch.rand(n, generator=gen) * max_frac * min(h, w)).long() + 1  # (n,)
    cy = torch.randint(0, h, (n,), generator=gen)
    cx = torch.randint(0, w, (n,), generator=gen)
    ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])  # (n, h)
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])  # (n, w)
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (n, 1, h, w)
    return torch.where(box, torch.full_like(x, fill), x)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``b + factor × (a - b)`` per row (PIL's ImageEnhance), clamped to [0, 1]."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _affine(x: Tensor, ops: list[tuple[Tensor, str, Tensor]]) -> Tensor:
    """Apply the geometric ops (row mask, name, magnitude in [0, 1]) in one grid_sample."""
    n = x.shape[0]
    theta = torch.eye(3).repeat(n, 1, 1)  # (n, 3, 3) in normalized coordinates
    for sel, name, mag in ops:
        m = torch.eye(3).repeat(n, 1, 1)
        if name == "rotate":
            a = mag * math.radians(30)
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        elif name == "shear_x":
            m[:, 0, 1] = 0.3 * mag
        elif name == "shear_y":
            m[:, 1, 0] = 0.3 * mag
        elif name == "translate_x":
            m[:, 0, 2] = 2 * 0.3 * mag  # 30% of the side; normalized coordinates span 2
        elif name == "translate_y":
            m[:, 1, 2] = 2 * 0.3 * mag
        theta = torch.where(sel.view(-1, 1, 1), m @ theta, theta)
    grid = torch.nn.functional.affine_grid(theta[:, :2], list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _intensity(name: str, x: Tensor, mag: Tensor) -> Tensor:
    """One intensity op on rows ``x`` (m, c, h, w) with magnitudes ``mag`` (m,) in [0, 1]."""
    # here, not at module level: torchvision costs ~1.4 s to import and vectors never need it
    import torchvision.transforms.v2.functional as TF

    if name == "autocontrast":
        return TF.autocontrast(x)
    if name == "equalize":
        return TF.equalize(x)
    factor = 0.55 + 0.9 * mag  # enhance factors in [0.55, 1.45], around 1
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if name == "contrast":
        return _blend(x, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
    if name == "sharpness":
        return _blend(x, TF.adjust_sharpness(x, 0.0), factor)
    if name == "posterize":  # keep 4..8 bits
        q = 2.0 ** (4 + (4 * mag).floor()).view(-1, 1, 1, 1)
        return torch.floor(x * (q - 1) + 0.5) / (q - 1)
    if name == "solarize":  # invert pixels above a threshold in [0, 1]
        return torch.where(x >= mag.view(-1, 1, 1, 1), 1.0 - x, x)
    raise ValueError(f"unknown op {name!r}; expected one of {STRONG_OPS}")


def strong(x: Tensor, gen: torch.Generator, n_ops: int = 2, cut: float = 0.5) -> Tensor:
    """RandAugment (``n_ops`` random ops per row, random magnitudes) then cutout.

    ``x`` (n, c, h, w) in [0, 1] -> the same shape. Magnitudes are drawn per row and op;
    signed ops (rotate, shear, translate) get a random sign. Vectors (n, d):
    :func:`strong_vector`."""
    if x.dim() == 2:
        return strong_vector(x, gen)
    if x.dim() != 4:
        return x
    n = x.shape[0]
    pick = torch.randint(0, len(STRONG_OPS), (n_ops, n), generator=gen)  # op of each slot/row
    mags = torch.rand(n_ops, n, generator=gen)  # magnitude in [0, 1]
    signs = torch.where(torch.rand(n_ops, n, generator=gen) < 0.5, -1.0, 1.0)
    geo: list[tuple[Tensor, str, Tensor]] = []
    for k in range(n_ops):
        for i, name in enumerate(STRONG_OPS):
            sel = pick[k] == i  # (n,) rows that apply this op in slot k
            if name == "identity" or not bool(sel.any()):
                continue
            if name in _GEOMETRIC:
                geo.append((sel, name, mags[k] * signs[k]))
                continue
            rows = sel.nonzero().squeeze(1)  # work on the selected rows only
            x = x.index_copy(0, rows, _intensity(name, x[rows], mags[k][rows]))
    if geo:
        x = _affine(x, geo)
    return cutout(x, gen, cut) if cut > 0 else x
