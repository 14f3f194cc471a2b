"""Backend fitting with one Ray actor per unlabeled shard.

Each actor wraps the same :class:`~raysl.backends.base.ShardWorker` the local executor uses,
so a Ray fit and a local fit give identical results. The shard is put in the object store once
(at actor creation, so a restarted actor reloads it); each round only the backend state
travels. Actors are killed when the fit ends, so their CPUs are free for the next stage.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import numpy as np
import ray

from raysl.backends.base import BackendFactory, FitContext, Shard, ShardWorker


class RayExecutor:
    """An :class:`~raysl.backends.base.Executor` over Ray actors; use it as a context manager."""

    def __init__(self, factory: BackendFactory, backend_cfg: Any, ctx: FitContext,
                 shards: list[Shard], num_cpus: float = 0.5, num_gpus: float = 0.0) -> None:
        # Restarted actors re-run the constructor (state reset) and retried calls re-send the
        # state, which is safe because ShardWorker is stateless between calls.
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=2,
                               max_task_retries=2)(ShardWorker)
        ctx_ref = ray.put(ctx)
        self.actors = [actor_cls.remote(factory, backend_cfg, ctx_ref, ray.put(s))
                       for s in shards]

    def stats(self, state: dict[str, Any]) -> list[Any]:
        ref = ray.put(state)
        return ray.get([a.stats.remote(ref) for a in self.actors])

    def predict(self, state: dict[str, Any]) -> list[np.ndarray]:
        ref = ray.put(state)
        return ray.get([a.predict.remote(ref) for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
