"""Text as feature vectors, so text runs through the vector pipeline unchanged.

TF-IDF (scikit-learn's ``TfidfVectorizer``: word 1- and 2-grams, sublinear tf, ``min_df`` 2,
at most ``data.text_features`` terms) fitted on the training rows' texts only (the labeled rows
and the unlabeled pool; never validation or test), then truncated SVD (latent semantic
analysis) to ``data.text_dim`` dense float32 columns fitted on the same rows. The result is an
``(n, text_dim)`` float32 matrix: the MLP, the GMM, the generative backends and the vector
augmentations (Gaussian noise; VIME's mask-and-replace, which on LSA columns acts as a soft
word dropout) take it as they take any feature vectors.

The fitted transform is kept in the :class:`~raysl.data.Split` (``text``), not in ``model.pt``:
a saved model takes these feature vectors, not raw strings. :meth:`TextFeatures.save` writes
it as JSON (vocabulary, idf) plus ``.npz`` (SVD components), no pickle;
:meth:`TextFeatures.load` reads it back, so ``features(["a review"])`` gives the model's input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysl.errors import DataError

NGRAMS = (1, 2)
MIN_DF = 2


def _vectorizer(max_features: int | None, vocabulary: dict[str, int] | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(sublinear_tf=True, ngram_range=NGRAMS, min_df=MIN_DF,
                           max_features=max_features, vocabulary=vocabulary,
                           dtype=np.float32)


@dataclass(frozen=True, eq=False)
class TextFeatures:
    """A fitted text -> vector transform: TF-IDF, then (``components`` not None) a projection
    on the SVD components. ``__call__(texts)`` -> ``(n, d)`` float32."""

    vectorizer: Any  # a fitted sklearn TfidfVectorizer
    components: np.ndarray | None  # (d, n_terms) float32, or None: the TF-IDF columns as is

    @staticmethod
    def fit(texts: Sequence[str], max_features: int, dim: int, seed: int = 0) -> TextFeatures:
        """Fit on ``texts`` (the training rows). ``dim`` 0 keeps the TF-IDF columns (dense:
        ``max_features`` float32 per row); else at most ``dim`` SVD columns (fewer when the
        vocabulary or the rows are fewer)."""
        from sklearn.decomposition import TruncatedSVD

        vec = _vectorizer(max_features)
        try:
            tfidf = vec.fit_transform(texts)
        except ValueError as e:  # e.g. no term in at least MIN_DF texts
            raise DataError(f"text features: {e} ({len(texts)} training texts; a term must "
                            f"occur in at least {MIN_DF} of them)") from None
        components = None
        n_terms = tfidf.shape[1]
        k = min(dim, n_terms - 1, tfidf.shape[0] - 1)
        if dim > 0 and k >= 1:
            svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=5,
                               random_state=seed).fit(tfidf)
            components = svd.components_.astype(np.float32)
        return TextFeatures(vec, components)

    @property
    def dim(self) -> int:
        return (len(self.components) if self.components is not None
                else len(self.vectorizer.vocabulary_))

    def tfidf(self, texts: Sequence[str]) -> Any:
        """The sparse TF-IDF rows ``(n, n_terms)`` (before the SVD)."""
        return self.vectorizer.transform(texts)

    def __call__(self, texts: Sequence[str], batch: int = 8192) -> np.ndarray:
        """``texts`` -> ``(n, dim)`` float32, in batches (a dense TF-IDF block stays small)."""
        out = np.empty((len(texts), self.dim), np.float32)
        for i in range(0, len(texts), batch):
            t = self.tfidf(texts[i : i + batch])
            out[i : i + batch] = (t @ self.components.T if self.components is not None
                                  else t.toarray())
        return out

    def save(self, path: str | Path) -> Path:
        """``path``.json (vocabulary, idf, settings) and, with an SVD, ``path``.npz
        (``components``): plain data, no pickle. Returns the .json path."""
        p = Path(path)
        vec = self.vectorizer
        meta = {"ngram_range": list(NGRAMS), "min_df": MIN_DF, "sublinear_tf": True,
                "vocabulary": {t: int(i) for t, i in vec.vocabulary_.items()},
                "idf": vec.idf_.astype(float).tolist(), "svd": self.components is not None}
        p.with_suffix(".json").write_text(json.dumps(meta))
        if self.components is not None:
            np.savez(p.with_suffix(".npz"), components=self.components)
        return p.with_suffix(".json")

    @staticmethod
    def load(path: str | Path) -> TextFeatures:
        p = Path(path)
        meta = json.loads(p.with_suffix(".json").read_text())
        vec = _vectorizer(None, meta["vocabulary"])
        vec.fit([""] if not meta["vocabulary"] else list(meta["vocabulary"])[:1])  # sets state
        vec.idf_ = np.asarray(meta["idf"], np.float64)
        components = None
        if meta["svd"]:
            with np.load(p.with_suffix(".npz"), allow_pickle=False) as f:
                components = f["components"]
        return TextFeatures(vec, components)


def check_texts(texts: Any, what: str) -> np.ndarray:
    """``texts`` as a 1-D object array of str, or DataError naming ``what`` (the column)."""
    arr = np.asarray(texts, dtype=object)
    if arr.ndim != 1:
        raise DataError(f"{what}: has shape {arr.shape}; expected one text per row")
    bad = [i for i, t in enumerate(arr) if not isinstance(t, str)]
    if bad:
        kinds = sorted({"null" if arr[i] is None or arr[i] != arr[i] else type(arr[i]).__name__
                        for i in bad[:100]})
        raise DataError(f"{what}: {len(bad)} of {len(arr)} rows are not strings ({', '.join(kinds)}"
                        f"; first rows: {bad[:5]}); every row needs a text (an empty string is "
                        "allowed)")
    return arr
