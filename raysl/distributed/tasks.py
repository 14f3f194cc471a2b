"""Generator functions as Ray tasks whose yielded items stream back to the driver."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from raysl.config import RayConfig
from raysl.distributed.session import ensure_ray


def stream(fn: Callable[..., Iterator[Any]], calls: list[tuple[Any, ...]], num_cpus: float,
           workers: int, on_item: Callable[[Any], None]) -> None:
    """Run ``fn(*args)`` for every ``args`` in ``calls`` as a Ray generator task of
    ``num_cpus`` CPUs, and pass each yielded item to ``on_item`` as soon as it arrives (in
    arrival order across tasks). A local Ray started here gets ``num_cpus × workers`` CPUs, so
    ``workers`` tasks run at once; with ``RAY_ADDRESS`` set they spread over that cluster. A task
    whose worker dies is retried once (its items so far are delivered again)."""
    import ray

    started = ensure_ray(RayConfig(num_cpus=max(1, round(num_cpus * workers))))
    try:
        task = ray.remote(num_cpus=num_cpus, max_retries=1)(fn)
        gens = [task.remote(*args) for args in calls]
        while gens:
            ready, _ = ray.wait(gens, num_returns=1)
            for g in ready:
                try:
                    on_item(ray.get(next(g)))
                except StopIteration:
                    gens.remove(g)
    finally:
        if started:
            ray.shutdown()
