"""``raysl bench gmm-speed``: seconds per EM round of raysl's sharded GMM against
scikit-learn's ``GaussianMixture`` on the same rows, dimensions, components and rounds.

The rows are a dataset's training images. raysl fits them as the pipeline does (its moment
PCA to ``--dim`` dimensions in a first round, not timed); scikit-learn gets the same PCA
projection, computed beforehand. Both run ``--rounds`` EM rounds with the tolerance at 0, full
covariances, one component per class. raysl runs in this process over 1 and 2 shards
(LocalExecutor) and, unless ``--local``, on Ray actors over 2 shards; scikit-learn fits the
rows unlabeled (it has no labeled term, which costs raysl a few hundred rows).

    raysl bench gmm-speed [--dataset fashion_mnist] [--rows 56000] [--dim 30] [--rounds 20]
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import numpy as np

from raysl.backends.base import LocalExecutor, Shard, ShardWorker, fit
from raysl.config import Config, DataConfig, apply_overrides
from raysl.data import load_dataset, shard


def _rows(dataset: str, n: int, dim: int, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(x (n, D) raw rows, z (n, dim) their PCA projection, labels (n,), classes) from the
    dataset's training rows."""
    from raysl.backends.gmm import moments, pca_from_moments

    ds = load_dataset(DataConfig(dataset=dataset))
    idx = np.random.default_rng(seed).permutation(len(ds.y))[:n]
    x = ds.x[idx].reshape(len(idx), -1).astype(np.float32)
    mean, proj, _ = pca_from_moments(*moments(x), dim)
    return x, (x.astype(np.float64) - mean) @ proj, ds.y[idx], ds.n_classes


def raysl_fit(x: np.ndarray, y: np.ndarray, n_classes: int, dim: int, rounds: int,
              n_shards: int, ray_actors: bool, labels_per_class: int = 10) -> float:
    """Seconds per EM round of raysl's GMM on raw rows ``x`` over ``n_shards`` shards, as the
    pipeline fits it (its own PCA to ``dim`` in round 1, which is not counted);
    ``labels_per_class`` rows keep their label, the rest are unlabeled."""
    from raysl.backends import BACKENDS, FitContext

    cfg: Config = apply_overrides(Config(), {"backend.name": "gmm", "backend.gmm.pca_dim": dim,
                                             "backend.gmm.max_iter": rounds,
                                             "backend.gmm.tol": 0.0})
    lab = np.concatenate([np.where(y == c)[0][:labels_per_class] for c in range(n_classes)])
    unl = np.setdiff1d(np.arange(len(y)), lab)
    x_l, y_l = x[lab], y[lab]
    ctx = FitContext(n_classes, (x.shape[1],), seed=0)
    factory = BACKENDS["gmm"]
    shards = [Shard(part, x_l, y_l, i) for i, part in enumerate(shard(x[unl], n_shards))]
    stamps: list[float] = []

    def progress(rnd: int, _: float) -> None:
        stamps.append(time.perf_counter())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter is the point here
        if ray_actors:
            from raysl.distributed.actors import RayExecutor

            with RayExecutor(factory, cfg.backend, ctx, shards) as ex:
                fit(factory(cfg.backend, ctx), ex, x_l, y_l, progress=progress)
        else:
            ex = LocalExecutor([ShardWorker(factory, cfg.backend, ctx, s) for s in shards])
            fit(factory(cfg.backend, ctx), ex, x_l, y_l, progress=progress)
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)  # after the moments round


def sklearn_fit(z: np.ndarray, n_classes: int, rounds: int) -> float:
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=n_classes, covariance_type="full", max_iter=rounds,
                         tol=0.0, random_state=0, init_params="random_from_data")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(z)
    return (time.perf_counter() - t0) / max(gm.n_iter_, 1)


def table(rows: list[tuple[str, float]], n: int, dim: int, k: int) -> str:
    lines = [f"GMM EM, {n} rows × {dim} dims, {k} components (full covariances)", "",
             "| fit | seconds per round | rows per second |", "|---|---|---|"]
    lines += [f"| {name} | {s:.3f} | {n / s:,.0f} |" for name, s in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="raysl bench gmm-speed", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--rows", type=int, default=56_000)
    ap.add_argument("--dim", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local", action="store_true", help="no Ray actors row")
    args = ap.parse_args(argv)
    x, z, y, k = _rows(args.dataset, args.rows, args.dim)
    fit_args = (y, k, args.dim, args.rounds)
    rows: list[tuple[str, Any]] = [
        ("scikit-learn GaussianMixture (1 process, on the projected rows)",
         sklearn_fit(z, k, args.rounds)),
        ("raysl, 1 shard in this process", raysl_fit(x, *fit_args, 1, False)),
        ("raysl, 2 shards in this process", raysl_fit(x, *fit_args, 2, False)),
    ]
    if not args.local:
        import ray

        from raysl.distributed.session import start_local

        start_local(num_cpus=2, logging_level="WARNING")
        try:
            rows.append(("raysl, 2 shards on Ray actors", raysl_fit(x, *fit_args, 2, True)))
        finally:
            ray.shutdown()
    print(table(rows, len(z), args.dim, k))
    return 0
