"""Resource requests that can never be met are errors before anything waits."""

from __future__ import annotations

import socket
import time

import pytest

from raysl.config import Config, apply_overrides
from raysl.distributed.resources import check_reachable, check_resources
from raysl.errors import ConfigError

TWO_CPUS = [{"CPU": 2.0}]


def _cfg(**keys: object) -> Config:
    return apply_overrides(Config(), keys)


def test_workers_beyond_the_cpus_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.num_workers=8 × train\.cpus_per_worker=0\.5"
                                          r".*2 CPUs .*room for 4"):
        check_resources(_cfg(**{"train.num_workers": 8}), TWO_CPUS)
    check_resources(_cfg(**{"train.num_workers": 4}), TWO_CPUS)  # 4 × 0.5 fits
    check_resources(_cfg(**{"train.num_workers": 0, "train.cpus_per_worker": 64.0}), TWO_CPUS)


def test_a_worker_must_fit_on_one_node() -> None:
    nodes = [{"CPU": 1.0}, {"CPU": 1.0}]  # 2 CPUs in all, but no node has 2
    with pytest.raises(ConfigError, match=r"room for 0"):
        check_resources(_cfg(**{"train.num_workers": 1, "train.cpus_per_worker": 2.0}), nodes)
    check_resources(_cfg(**{"train.num_workers": 2, "train.cpus_per_worker": 1.0}), nodes)


def test_gpus_and_actor_cpus_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"train\.use_gpu=true .* 0 GPUs"):
        check_resources(_cfg(**{"train.use_gpu": True, "train.num_workers": 1}), TWO_CPUS)
    check_resources(_cfg(**{"train.use_gpu": True, "train.num_workers": 2}),
                    [{"CPU": 8.0, "GPU": 2.0}])
    with pytest.raises(ConfigError, match=r"backend\.actor_cpus=4\.0: no Ray node"):
        check_resources(_cfg(**{"backend.actor_cpus": 4.0}), TWO_CPUS)


def test_an_unreachable_address_fails_fast() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"ray\.address='127\.0\.0\.1:{port}': no Ray head"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    check_reachable("auto")  # left to Ray
    check_reachable("ray://somewhere:10001")


@pytest.mark.ray
def test_num_workers_beyond_the_cpus_fails_in_seconds(ray_session: None, tmp_path) -> None:
    """Through the pipeline on the session's Ray (2 CPUs): refused before any stage runs."""
    from raysl import pipeline

    cfg = _cfg(**{"train.num_workers": 8, "train.cpus_per_worker": 1.0, "train.epochs": 1})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"train\.num_workers=8"):
        pipeline.run(cfg, tmp_path)
    assert not (tmp_path / "baseline").exists()
    assert time.perf_counter() - t0 < 60  # an integration bound, not a benchmark: it used to hang
