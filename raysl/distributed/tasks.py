"""Ray tasks the pipeline runs: generator functions whose yielded items stream back to the
driver, and small functions on the parts of the pool's columns (:mod:`raysl.columns`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
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


def _on_part(fn: Callable[..., Any], i: int, offset: int, kwargs: dict[str, Any],
             *objs: dict[str, Any]) -> Any:
    from raysl.columns import merged

    return fn(i, offset, merged(objs), **kwargs)


@functools.cache
def _part_task() -> Any:
    import ray

    from raysl.distributed.pool import TASK_OPTIONS

    return ray.remote(**TASK_OPTIONS)(_on_part)


def map_parts(fn: Callable[..., Any], parts: Sequence[Sequence[Any]], offsets: Sequence[int],
              kwargs: dict[str, Any], fetch: bool = True) -> list[Any]:
    """``fn(i, offsets[i], columns, **kwargs)`` for every part i of
    :class:`raysl.columns.PoolColumns` as a light Ray task, where the part's objects are (Ray
    resolves the refs among ``parts[i]`` into their dicts); the results, or their refs when
    not ``fetch``."""
    import ray

    task = _part_task()
    refs = [task.remote(fn, i, off, kwargs, *objs)
            for i, (off, objs) in enumerate(zip(offsets, parts, strict=True))]
    return ray.get(refs) if fetch else refs
