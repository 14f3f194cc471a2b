"""Choosing which pseudo-labels to keep (pure numpy).

A selection is a :class:`Rule` planned from a few per-shard counts and then applied by each
shard to its own rows, so that the pool's labels and confidences never need to be in one
place (:class:`raysl.columns.PoolColumns`): ``threshold`` keeps ``conf > t``; ``k_best`` and
``per_class`` keep the rows up to a cut in one total order (most confident first, ties to the
lower pool position, :func:`rank_keys`), the cut found by a radix select over the shards'
histograms (:func:`plan_selection`: 8 rounds of one small histogram per shard, whatever the
pool's size). :func:`select_labels` is the same on one shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CRITERIA = ("threshold", "k_best", "per_class")
# rank_keys: 33 bits of (reversed) float32 confidence above 31 bits of pool position
_POS_BITS = 31
MAX_ROWS = 1 << _POS_BITS
_DIGIT = 8  # bits a radix round fixes: 8 rounds for 64-bit keys
_ROUNDS = 64 // _DIGIT


@dataclass(frozen=True, eq=False)
class Selection:
    mask: np.ndarray  # (n_u,) bool, rows kept
    labels: np.ndarray  # (n_u,) int64 argmax pseudo-label of every row
    conf: np.ndarray  # (n_u,) float, its probability

    @property
    def coverage(self) -> float:
        return float(self.mask.mean()) if len(self.mask) else 0.0

    def per_class(self, n_classes: int) -> list[int]:
        """How many rows are kept for each class."""
        return np.bincount(self.labels[self.mask], minlength=n_classes).tolist()


@dataclass(frozen=True, eq=False)
class Rule:
    """Which rows a selection keeps, small enough to send to every shard: ``threshold``
    (``criterion == "threshold"``: ``conf > threshold``), else per group (every class for
    ``per_class``, one group for ``k_best``) the rows whose :func:`rank_keys` is at most
    ``cut[g]`` where ``take[g]``."""

    criterion: str
    threshold: float = 0.0
    cut: np.ndarray | None = None  # (G,) uint64
    take: np.ndarray | None = None  # (G,) bool

    def mask(self, labels: np.ndarray, conf: np.ndarray, offset: int) -> np.ndarray:
        """The kept rows (n_i,) bool of a shard whose rows start at pool position ``offset``;
        ``labels``, ``conf`` (n_i,)."""
        if self.criterion == "threshold":
            return np.asarray(conf) > self.threshold
        if self.criterion == "none":
            return np.zeros(len(conf), bool)
        assert self.cut is not None and self.take is not None
        g = _groups(labels, len(self.cut))
        return self.take[g] & (rank_keys(conf, offset) <= self.cut[g])


NOTHING = Rule("none")  # keeps no row (the guard's empty selection)


def rank_keys(conf: np.ndarray, offset: int) -> np.ndarray:
    """Each row's place in "most confident first, ties to the lower pool position" as one
    uint64 (n_i,) per row: smaller keys come first. ``conf`` (n_i,) >= 0 is compared as
    float32 (the shard workers' confidences are float32); the rows are at pool positions
    ``offset ..`` (below :data:`MAX_ROWS`). Non-negative float32 order as their bit patterns,
    so the key is the reversed bits above the position."""
    n = len(conf)
    if offset + n > MAX_ROWS:
        raise ValueError(f"pool positions up to {offset + n}: at most {MAX_ROWS} rows")
    c = np.asarray(conf, np.float32) + np.float32(0.0)  # -0.0 -> 0.0
    bits = c.view(np.uint32).astype(np.uint64)
    pos = np.arange(offset, offset + n, dtype=np.uint64)
    return ((np.uint64(0xFFFFFFFF) - bits) << np.uint64(_POS_BITS)) | pos


def _groups(labels: np.ndarray, n_groups: int) -> np.ndarray:
    return (np.asarray(labels, np.int64) if n_groups > 1
            else np.zeros(len(labels), np.int64))


def radix_histogram(keys: np.ndarray, groups: np.ndarray, prefix: np.ndarray, level: int
                    ) -> np.ndarray:
    """One radix round over some rows: per group g (``len(prefix)`` groups), the count of the
    rows of ``groups == g`` whose key starts with ``prefix[g]``'s top ``8 * level`` bits, by
    the next 8 bits: (G, 256) int64. ``keys`` (n,) uint64, ``groups`` (n,) in 0..G-1. Counts
    of disjoint sets of rows add up, so each shard (or block) counts its own."""
    n_groups = len(prefix)
    g = np.asarray(groups, np.int64)
    if level:
        hi = np.uint64(64 - _DIGIT * level)
        hit = (keys >> hi) == (prefix[g] >> hi)
        g, keys = g[hit], keys[hit]
    digit = ((keys >> np.uint64(64 - _DIGIT * (level + 1))) & np.uint64(255)).astype(np.int64)
    return np.bincount(g * 256 + digit, minlength=n_groups * 256).reshape(n_groups, 256)


def key_histogram(labels: np.ndarray, conf: np.ndarray, offset: int, prefix: np.ndarray,
                  level: int) -> np.ndarray:
    """:func:`radix_histogram` of one shard's :func:`rank_keys`, grouped by label (classes)
    or all in one group: (G, 256) int64."""
    return radix_histogram(rank_keys(conf, offset), _groups(labels, len(prefix)), prefix, level)


def class_counts(labels: np.ndarray, conf: np.ndarray, offset: int, n_classes: int
                 ) -> np.ndarray:
    """Rows per argmax label (C,) of one shard."""
    return np.bincount(np.asarray(labels, np.int64), minlength=n_classes)


# run(fn, **kwargs) -> [fn(labels, conf, offset, **kwargs) for every shard]
ShardRunner = Callable[..., Sequence[np.ndarray]]


def plan_selection(run: ShardRunner, n_rows: int, n_classes: int,
                   criterion: str = "threshold", threshold: float = 0.95, k_best: int = 100,
                   prior: np.ndarray | None = None, share: float = 0.5) -> Rule:
    """The :class:`Rule` of a selection over a pool of ``n_rows`` rows in shards, from counts
    that ``run`` gathers from every shard (see :data:`ShardRunner`).

    ``threshold``: keep rows whose confidence exceeds ``threshold`` (strictly, as
    scikit-learn's SelfTrainingClassifier does, so 1.0 keeps nothing and 0.0 keeps
    everything). ``k_best``: keep the ``k_best`` most confident rows (all rows if there are
    fewer; ties go to the lower row index). ``per_class``: for each class c, the
    :func:`per_class_k` most confident rows labelled c (Yalniz et al. 2019; Noisy Student), so
    the kept labels follow ``prior`` (C,) (the labeled rows' distribution; uniform if None)
    instead of the backend's biases; when a class has fewer rows than that, every class keeps
    the same smaller share of its quota."""
    if criterion == "threshold":
        return Rule("threshold", threshold=float(threshold))
    if criterion == "k_best":
        need = np.array([min(max(k_best, 0), n_rows)], np.int64)
    elif criterion == "per_class":
        prior = np.full(n_classes, 1.0 / n_classes) if prior is None else np.asarray(prior)
        k = per_class_k(prior, n_rows, share)
        have = np.sum(run(class_counts, n_classes=n_classes), axis=0)
        # A class the backend rarely predicts scales every class down alike, so the kept
        # labels keep the prior's proportions (rather than duplicating its few rows).
        fill = min(1.0, *(have[k > 0] / k[k > 0])) if (k > 0).any() else 1.0
        need = np.minimum(np.floor(k * fill + 1e-9).astype(np.int64), have)
    else:
        raise ValueError(f"select.criterion={criterion!r}: must be 'threshold', 'k_best' or "
                         "'per_class'")
    def histogram(prefix: np.ndarray, level: int) -> np.ndarray:
        return np.sum(run(key_histogram, prefix=prefix, level=level), axis=0)

    return Rule(criterion, cut=kth_keys(histogram, need), take=need > 0)


def kth_keys(histogram: Callable[[np.ndarray, int], np.ndarray], need: np.ndarray
             ) -> np.ndarray:
    """Per group g, the ``need[g]``-th smallest key among the group's rows (G,) uint64 (0
    where ``need[g]`` is 0): a radix select. ``histogram(prefix, level)`` is the
    :func:`radix_histogram` (G, 256) of every row, summed over wherever the rows are (one
    call a round, 8 rounds for 64-bit keys). ``need[g]`` must not exceed the group's rows."""
    prefix = np.zeros(len(need), np.uint64)
    left = np.asarray(need, np.int64).copy()
    for level in range(_ROUNDS):
        if not (left > 0).any():
            break
        hist = histogram(prefix, level)
        cum = np.cumsum(hist, axis=1)
        for g in np.flatnonzero(left > 0):
            d = int(np.searchsorted(cum[g], left[g]))  # first digit reaching the count
            left[g] -= int(cum[g, d - 1]) if d else 0
            prefix[g] |= np.uint64(d) << np.uint64(64 - _DIGIT * (level + 1))
    return prefix


def class_prior(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Class distribution (C,) of labels ``y`` (n,) (rows with -1 ignored); uniform if empty."""
    counts = np.bincount(y[y >= 0], minlength=n_classes).astype(np.float64)
    return counts / counts.sum() if counts.sum() else np.full(n_classes, 1.0 / n_classes)


def align_to_prior(proba: np.ndarray, prior: np.ndarray,
                   p_model: np.ndarray | None = None) -> np.ndarray:
    """Distribution alignment in one shot: :func:`raysl.losses.align_distribution` (the online
    one FixMatch uses) with the backend's mean prediction as ``p_model`` (C,; default: the
    mean of ``proba``, else the whole pool's when ``proba`` (n, C) is one shard of it) and
    ``prior`` (C,) as the target. Returns (n, C) float64."""
    import torch

    from raysl.losses import align_distribution

    p = torch.from_numpy(np.asarray(proba, np.float64))
    # copies of the (C,) vectors: they may come read-only from Ray's object store, which
    # torch.from_numpy warns about in every shard actor's log
    mean = p.mean(0) if p_model is None else torch.tensor(p_model, dtype=torch.float64)
    return align_distribution(p, mean, torch.tensor(prior, dtype=torch.float64)).numpy()


def per_class_k(prior: np.ndarray, n_u: int, share: float) -> np.ndarray:
    """Rows to keep per class (C,): ``share`` of the rows the prior expects in a pool of
    ``n_u`` (at least 1 for a class the prior has)."""
    k = np.floor(prior * n_u * share).astype(np.int64)
    return np.where(prior > 0, np.maximum(k, 1), 0)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """½ Σ |p - q| of two distributions (C,): 0 identical, 1 disjoint."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def select(proba: np.ndarray, criterion: str = "threshold", threshold: float = 0.95,
           k_best: int = 100, prior: np.ndarray | None = None,
           share: float = 0.5) -> Selection:
    """Pick pseudo-labels from class probabilities ``proba`` (n_u, C): :func:`select_labels`
    of their argmax labels and probabilities."""
    return select_labels(proba.argmax(axis=1), proba.max(axis=1), proba.shape[1], criterion,
                         threshold, k_best, prior, share)


def select_labels(labels: np.ndarray, conf: np.ndarray, n_classes: int,
                  criterion: str = "threshold", threshold: float = 0.95, k_best: int = 100,
                  prior: np.ndarray | None = None, share: float = 0.5) -> Selection:
    """:func:`plan_selection` over one shard, each row's argmax label ``labels`` (n_u,) and
    its probability ``conf`` (n_u,) of ``n_classes`` classes, applied: the kept rows."""
    labels = np.asarray(labels).astype(np.int64, copy=False)

    def run(fn: Callable[..., np.ndarray], **kw: object) -> list[np.ndarray]:
        return [fn(labels, conf, 0, **kw)]

    rule = plan_selection(run, len(conf), n_classes, criterion, threshold, k_best, prior, share)
    return Selection(rule.mask(labels, conf, 0), labels, conf)
