"""One frozen config for the whole pipeline, loaded from YAML with typed dotted overrides.

The CLI (``--set select.threshold=0.9``), the YAML files and (later) Ray Tune all go through
:func:`apply_overrides`, so any run can be replayed from the command line with the same keys.
Every value is checked against a declared limit in :data:`LIMITS` before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysl.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # a name in raysl.data.DATASETS, or a path: .npz, .parquet, .csv
    # (a file, folder, glob or URI such as s3://...), an image folder tree or manifest
    root: str = "~/.cache/raysl/data"  # torchvision datasets and MNIST-format idx files
    download: bool = False  # only torchvision datasets, only on a networked machine
    # A user's files (raysl.readers, read through Ray Data): the label column of .csv / .parquet
    # data and image manifests (null, empty or -1: unlabeled); the feature columns, () for
    # every column but the label (all numeric then); images resized to image_size x image_size
    # pixels (one side; 0: keep the first image's size, which every image must then have); the
    # folder of an image tree's unlabeled images (ROOT/<class>/... are the labeled ones)
    label_column: str = "y"
    feature_columns: tuple[str, ...] = ()
    image_size: int = 0
    unlabeled_dir: str = "unlabeled"
    # N > 0: N labeled rows per class, the rest hidden in the unlabeled pool (benchmarks);
    # 0: every label of data that has unlabeled (-1) rows, 5 per class of fully labeled data
    labels_per_class: int = 0
    val_per_class: int = 5  # a small labeled validation split (Oliver et al. 2018)
    test_fraction: float = 0.2  # held out when the dataset has no official test split
    n_shards: int = 2  # unlabeled shards, one Ray actor each
    seed: int = 0
    # feature vectors: zero mean, unit variance per column from the training rows' moments,
    # saved inside model.pt (raysl.preprocess); images keep [0, 1]
    standardize: bool = True
    # text (raysl.text): the text column of a .csv / .parquet file; the encoder: "minilm" (a
    # frozen pretrained sentence encoder), "tfidf", or a sentence-transformers model folder;
    # for tfidf, the terms kept (word 1-2 grams) and the SVD (LSA) columns the texts become,
    # 0: the TF-IDF columns themselves (dense)
    text_column: str = "text"
    text_encoder: str = "minilm"
    text_features: int = 20000
    text_dim: int = 300


@dataclass(frozen=True)
class GMMConfig:
    components_per_class: int = 1
    # the space the mixture is fitted in, before the PCA: "pca" (the inputs themselves) or
    # "embedding" (the baseline classifier's penultimate layer, computed on each shard)
    features: str = "pca"
    pca_dim: int = 16  # 0 fits in the feature space itself (inputs or embedding)
    reg_covar: float = 1.0  # covariance prior strength, relative to the mean data variance
    max_iter: int = 100
    tol: float = 1e-5  # stop when the objective's relative gain falls below this
    # each labeled row counts as this many rows in EM (the pool outnumbers them 100 to 1; the
    # mixture drifts from the classes towards clusters). Measured in raysl bench backends
    labeled_weight: float = 5.0


@dataclass(frozen=True)
class VAEConfig:
    """Semi-supervised VAE (Kingma et al. 2014, M2, optionally on M1 features), FedAvg rounds."""

    rounds: int = 20  # FedAvg rounds: local training on every shard, then weight averaging
    local_epochs: int = 2  # passes over the shard's unlabeled rows per round
    batch_size: int = 64  # unlabeled rows per step (each step also draws a labeled batch)
    labeled_batch_size: int = 32
    lr: float = 2e-3  # Adam; constant for half the rounds, then linear decay
    alpha: float = 20.0  # weight of the labeled rows' classification term
    latent_dim: int = 16  # z of M2
    m1_dim: int = 32  # latent size of the M1 VAE that M2 is stacked on; 0: M2 on the inputs
    hidden: int = 256
    # what the networks model: "embedding" (the baseline classifier's penultimate layer,
    # computed on each shard, standardized) or "inputs" (the rows themselves). 10 labels per
    # class, 3 seeds: 93.8% vs 83.9% on mnist5k, 70.7% vs 71.6% on Fashion-MNIST, 2-3x faster
    features: str = "embedding"


@dataclass(frozen=True)
class GANConfig:
    """Semi-supervised GAN (Salimans et al. 2016): K+1-class discriminator, feature matching."""

    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 64  # unlabeled (and generated) rows per step
    labeled_batch_size: int = 32
    lr: float = 1e-3  # Adam, both networks; constant for half the rounds, then linear decay
    noise_dim: int = 64  # generator input
    hidden: int = 256
    # what the discriminator classifies and the generator generates: "embedding" (the
    # baseline classifier's penultimate layer, as for backend.vae.features) or "inputs".
    # 10 labels per class, 3 seeds: 92.7% vs 82.0% on mnist5k, 69.8% vs 70.1% on Fashion-MNIST
    features: str = "embedding"


@dataclass(frozen=True)
class BackendConfig:
    # a key of raysl.backends.BACKENDS, or "auto": fit the cheap ones (AUTO_BACKENDS) and keep
    # the one with the best validation accuracy
    name: str = "auto"
    actor_cpus: float = 0.5  # fractional, so actors fit beside each other on small machines
    # Where a shard actor keeps its shard of the pool read from the object store: memory,
    # disk (a file-backed array, as train.share_storage) or auto (disk above a quarter of the
    # node's available memory). Where, never what: the same rows, the same fit.
    shard_storage: str = "auto"
    # temperature-scale the probabilities on the validation split (argmax labels unchanged);
    # T is bounded to [0.5, 30] and a degenerate fit keeps T = 1 (raysl.calibration.calibrate)
    calibrate: bool = True
    # Iterative self-training: rounds > 1 re-label the unlabeled pool with the last joint model
    # (as the `self` backend, same selection) and train the joint model again, each round.
    relabel_rounds: int = 1
    gmm: GMMConfig = field(default_factory=GMMConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    gan: GANConfig = field(default_factory=GANConfig)

    @property
    def in_embedding(self) -> bool:
        """True when backend ``name`` is fitted in the baseline classifier's embedding
        (``backend.<name>.features=embedding``): its fit then depends on the baseline."""
        return getattr(getattr(self, self.name, None), "features", None) == "embedding"


@dataclass(frozen=True)
class SelectConfig:
    criterion: str = "threshold"  # threshold | k_best | per_class
    threshold: float = 0.95  # keep rows whose confidence exceeds this (1.0 keeps none)
    k_best: int = 100  # with criterion=k_best: the k most confident rows
    # with criterion=per_class: per class, the most confident rows labelled so, as many as
    # per_class_share × (the labeled prior's share of the pool)
    per_class_share: float = 0.5
    align: bool = False  # scale the backend's probabilities to the labeled class prior first
    # The guard: drop the backend's labels (warning) when its validation accuracy is more than
    # guard_margin below the baseline's, or the kept labels' class distribution is more than
    # guard_max_tv (total variation) from the labeled rows'.
    guard: bool = True
    guard_margin: float = 0.02
    guard_max_tv: float = 0.25


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    # at least this many optimizer steps per worker in all (small pools give short epochs)
    min_steps: int = 500
    batch_size: int = 32  # labeled rows per step and worker
    mu: int = 3  # pseudo-labeled rows per labeled row in a step (FixMatch's mu)
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_u: float = 1.0  # weight of the pseudo-label loss; 0 is supervised training
    # width of the MLP / the CNN's dense layer; 0: a linear classifier (vectors only); -1: by
    # the data: 0 on a pretrained text encoder's vectors, else 256 (raysl.pipeline.model_width)
    hidden: int = -1
    num_workers: int = 2  # Ray Train workers (DDP); 0 runs the loop in the driver process
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    seed: int = 0
    # Online pseudo-labels (FixMatch). Off: training is exactly the offline-only loop above.
    fixmatch: bool = True  # strong-view CE on weak-view pseudo-labels; weak aug on labeled
    fixmatch_threshold: float = 0.95  # keep a weak-view label when its confidence >= this
    threshold_mode: str = "fixed"  # fixed | flexmatch (per-class) | freematch (self-adaptive)
    dist_align: bool = False  # align weak-view probabilities to a uniform class prior
    ema: float = 0.99  # EMA teacher decay (e.g. 0.999): evaluates, labels, is the result; 0 off
    offline: str = "warm"  # backend pseudo-labels with fixmatch: warm (weighted targets whose
    # weight decays linearly to 0 at half the steps), targets (throughout, as without
    # fixmatch), prior (multiply the weak-view probabilities by the backend's) or none.
    # Digits, 50 labels, 3 seeds: warm 97.2% (gmm) > targets 96.6% > prior 96.1%.
    init: str = "he"  # initial weights: torch (layer defaults) or he (Kaiming normal: no
    # plateau at chance in the first hundreds of steps; raysl.models.he_init)
    checkpoint_every: int = 1  # Ray Train checkpoint every N epochs (and after the last);
    # metrics are reported every epoch. A crash redoes at most N epochs.
    # Where a Ray Train rank keeps its share of rows read from the object store (the kept
    # pseudo-labeled rows, the pool): memory, disk (a memory-mapped file in the node's temp
    # directory, removed with the process; the OS pages rows in as the steps draw them), or
    # auto: disk when a field's share would take more than a quarter of the node's available
    # memory. Where, never what: the same rows, the same training.
    share_storage: str = "auto"


@dataclass(frozen=True)
class RayConfig:
    # False: every stage in this process, no Ray (small data, notebooks, the scikit-learn
    # estimator); train.num_workers and the actor settings are then ignored
    enabled: bool = True
    address: str = ""  # empty: join RAY_ADDRESS if set, else start a local Ray; "auto": join
    # the cluster started on this machine with `ray start`
    num_cpus: int = 0  # for a local Ray; 0 lets Ray count the cores
    # Ray Train checkpoints: a directory every node sees, or a cloud URI (s3://, gs://, ...);
    # empty: <out>/ray
    storage_path: str = ""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# Declared limits, checked by validate(). A tuple of strings is a set of choices; a pair of
# numbers is a closed interval (None leaves that side open). Dataset and backend names are
# checked where their registries live (raysl.data, raysl.backends).
LIMITS: dict[str, tuple[Any, ...]] = {
    "data.labels_per_class": (0, None),
    "data.val_per_class": (0, None),
    "data.test_fraction": (0.05, 0.9),
    "data.n_shards": (1, None),
    "data.text_features": (1, None),
    "data.text_dim": (0, None),
    "data.image_size": (0, None),
    "backend.actor_cpus": (0.01, None),
    "backend.relabel_rounds": (1, None),
    "backend.gmm.components_per_class": (1, None),
    "backend.gmm.features": ("pca", "embedding"),
    "backend.gmm.pca_dim": (0, None),
    "backend.gmm.reg_covar": (1e-9, None),
    "backend.gmm.max_iter": (1, None),
    "backend.gmm.tol": (0.0, None),
    "backend.gmm.labeled_weight": (0.0, None),
    "backend.vae.rounds": (1, None),
    "backend.vae.local_epochs": (1, None),
    "backend.vae.batch_size": (1, None),
    "backend.vae.labeled_batch_size": (1, None),
    "backend.vae.lr": (1e-9, None),
    "backend.vae.alpha": (0.0, None),
    "backend.vae.latent_dim": (1, None),
    "backend.vae.m1_dim": (0, None),
    "backend.vae.hidden": (1, None),
    "backend.vae.features": ("inputs", "embedding"),
    "backend.gan.rounds": (1, None),
    "backend.gan.local_epochs": (1, None),
    "backend.gan.batch_size": (1, None),
    "backend.gan.labeled_batch_size": (1, None),
    "backend.gan.lr": (1e-9, None),
    "backend.gan.noise_dim": (1, None),
    "backend.gan.hidden": (1, None),
    "backend.gan.features": ("inputs", "embedding"),
    "select.criterion": ("threshold", "k_best", "per_class"),
    "select.threshold": (0.0, 1.0),
    "select.k_best": (1, None),
    "select.per_class_share": (0.001, 1.0),
    "select.guard_margin": (0.0, 1.0),
    "select.guard_max_tv": (0.0, 1.0),
    "train.epochs": (1, None),
    "train.min_steps": (0, None),
    "train.batch_size": (1, None),
    "train.mu": (1, None),
    "train.lr": (1e-9, None),
    "train.momentum": (0.0, 1.0),
    "train.weight_decay": (0.0, None),
    "train.lambda_u": (0.0, None),
    "train.hidden": (-1, None),
    "train.num_workers": (0, None),
    "train.cpus_per_worker": (0.01, None),
    "train.fixmatch_threshold": (0.0, 1.0),
    "train.threshold_mode": ("fixed", "flexmatch", "freematch"),
    "train.ema": (0.0, 0.99999),
    "train.offline": ("targets", "warm", "prior", "none"),
    "train.init": ("torch", "he"),
    "train.checkpoint_every": (1, None),
    "train.share_storage": ("auto", "memory", "disk"),
    "backend.shard_storage": ("auto", "memory", "disk"),
    "ray.num_cpus": (0, None),
}


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted keys of a config class, e.g. ``["data.dataset", ..., "train.lambda_u"]``."""
    keys: list[str] = []
    for name in _fields(cls):
        typ = _type_of(cls, name)
        if dataclasses.is_dataclass(typ):
            keys += valid_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Parse/convert ``value`` to the field type ``typ`` or raise ConfigError naming ``key``."""
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}={value!r}: not a valid value ({e})") from None
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(typ) is tuple:  # tuple[str, ...]: a YAML list, or "a,b" from --set
        if value is None:  # "--set data.feature_columns=" or an empty YAML value
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(
                isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
            return tuple(str(v) for v in value)
        raise ConfigError(f"{key}={value!r}: expected a list of names, e.g. [a, b] or a,b")
    elif isinstance(typ, types.UnionType):  # pragma: no cover - no unions yet
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}={value!r}: expected {name}, got {type(value).__name__}")


def _unknown(key: str, cls: type, prefix: str) -> ConfigError:
    return ConfigError(
        f"unknown config key {key!r}; valid keys: " + ", ".join(valid_keys(cls, prefix))
    )


def _set(obj: Any, parts: list[str], value: Any, prefix: str) -> Any:
    cls = type(obj)
    name, rest = parts[0], parts[1:]
    key = prefix + name
    if name not in _fields(cls):
        raise _unknown(key, cls, prefix)
    typ = _type_of(cls, name)
    if dataclasses.is_dataclass(typ):
        if not rest:
            if isinstance(value, dict):  # a whole section, as YAML gives it
                sub = getattr(obj, name)
                for k, v in value.items():
                    sub = _set(sub, str(k).split("."), v, key + ".")
                return dataclasses.replace(obj, **{name: sub})
            raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.<key>=...")
        sub = _set(getattr(obj, name), rest, value, key + ".")
    else:
        if rest:
            raise _unknown(prefix + ".".join(parts), cls, prefix)
        sub = _coerce(key, value, typ)
    return dataclasses.replace(obj, **{name: sub})


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return ``cfg`` with dotted keys replaced: ``{"select.threshold": 0.9}``.

    Values may be typed (from YAML or Tune) or strings (from ``--set``), which are parsed as
    YAML scalars and type-checked against the field. Unknown keys raise ConfigError listing the
    valid keys. The result is validated.
    """
    for key, value in overrides.items():
        cfg = _set(cfg, str(key).split("."), value, "")
    validate(cfg)
    return cfg


def parse_set(items: list[str]) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}`` (values stay strings)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. select.threshold=0.9")
        out[key.strip()] = value.strip()
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (nested or dotted keys), then ``overrides``."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(p)!r}: file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:  # syntax errors, and tags such as !!python/... (refused)
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--config {str(p)!r}: not valid YAML{at}: {what} (plain "
                              "YAML only: keys, numbers, strings, lists)") from None
        except (UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"--config {str(p)!r}: unreadable ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {str(p)!r}: expected a mapping of config keys")
        for k, v in raw.items():
            cfg = _set(cfg, str(k).split("."), v, "")
    return apply_overrides(cfg, overrides or {})


def get(cfg: Any, key: str) -> Any:
    """Read a dotted key: ``get(cfg, "select.threshold")``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> None:
    """Check every declared limit; raise ConfigError naming the key, value and what is allowed."""
    for key in ("data.label_column", "data.unlabeled_dir"):  # names, not limits
        value = get(cfg, key)
        if not value.strip() or (key == "data.unlabeled_dir" and "/" in value):
            raise ConfigError(f"{key}={value!r}: must be a "
                              + ("folder name (no /)" if key.endswith("dir") else "column name"))
    for key, limit in LIMITS.items():
        value = get(cfg, key)
        if isinstance(limit[0], str):
            if value not in limit:
                raise ConfigError(f"{key}={value!r}: must be one of {', '.join(limit)}")
            continue
        lo, hi = limit
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            lo_s = "-inf" if lo is None else str(lo)
            hi_s = "inf" if hi is None else str(hi)
            raise ConfigError(f"{key}={value!r}: must be in [{lo_s}, {hi_s}]")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config (for YAML output and cache keys)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
