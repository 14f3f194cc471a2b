"""Shared fixtures. Ray starts once per session (2 CPUs), and only for tests that ask for it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from raysl.config import Config, apply_overrides


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray of the session's own, started as raysl starts one (its runtime_env)."""
    import ray

    from raysl.distributed.session import start_local

    start_local(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module: small models train faster, and results don't depend on
    the machine's core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_splits() -> list[tuple[Any, dict[str, Any]]]:
    """digits at 5 labels per class, split with seeds 0-4, each with a classifier (hidden
    width 32) trained 200 steps on its labeled rows, one torch thread: for claims that one
    split's few hundred pool rows can't carry (the embedding backends' tests)."""
    import torch

    from raysl.config import DataConfig, TrainConfig
    from raysl.data import load_dataset, make_split
    from raysl.train import TrainData, fit_classifier

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for seed in range(5):
            cfg = DataConfig(labels_per_class=5, seed=seed)
            sp = make_split(load_dataset(cfg), cfg)
            tcfg = TrainConfig(epochs=2, min_steps=200, hidden=32, fixmatch=False, lambda_u=0.0)
            data = TrainData(sp.x_l, sp.y_l, sp.x_l[:0], sp.y_l[:0], np.zeros(0, np.float32),
                             sp.x_val, sp.y_val, len(sp.x_u))
            out.append((sp, fit_classifier(data, tcfg, sp.input_shape, sp.n_classes).state))
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture
def tiny_config() -> Config:
    """digits, a few epochs, 2 DDP workers at 0.5 CPU: the whole pipeline in ~1 minute.

    The class-balance guard is off (``select.guard_max_tv=1``): these tests follow the
    pseudo-labels through the pipeline, and with training this short whether the kept
    labels pass it is the split's luck (on seed 0 both backends' kept labels are 0.32-0.44
    from the labeled balance). The guard has its own tests (test_no_harm)."""
    return apply_overrides(Config(), {
        "train.epochs": 3, "train.min_steps": 0, "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "backend.gmm.max_iter": 8, "data.n_shards": 2, "select.guard_max_tv": 1.0,
    })
