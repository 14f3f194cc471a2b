"""Shared fixtures. Ray starts once per session (2 CPUs), and only for tests that ask for it."""

from __future__ import annotations

from collections.abc import Iterator

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
