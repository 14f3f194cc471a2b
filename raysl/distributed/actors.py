"""Backend fitting with one Ray actor per unlabeled shard.

Each actor wraps the same :class:`~raysl.backends.base.ShardWorker` the local executor uses,
so a Ray fit and a local fit give identical results. The shard is put in the object store once
(at actor creation, so a restarted actor reloads it); each round only the backend state
travels. Actors are killed when the fit ends, so their CPUs are free for the next stage.
"""

from __future__ import annotations

from dataclasses import replace
from types import TracebackType
from typing import Any

import numpy as np
import ray

from raysl.backends.base import (
    BackendFactory,
    FitContext,
    LabelCall,
    Shard,
    ShardLabels,
    ShardWorker,
)
from raysl.distributed.pool import RemoteRows
from raysl.memory import keep_on_disk, process_memory


class _ShardActor(ShardWorker):
    def __init__(self, factory: BackendFactory, backend_cfg: Any, ctx: FitContext,
                 shard: Shard, labeled: tuple[np.ndarray, np.ndarray]) -> None:
        self.on_disk = False
        if isinstance(shard.x_u, RemoteRows):
            # the shard's rows from the object store, kept on the heap or on disk
            # (backend.shard_storage); the worker then holds an array either way
            self.on_disk = keep_on_disk(backend_cfg.shard_storage,
                                        (len(shard.x_u), *shard.x_u.row_shape))
            shard = replace(shard, x_u=shard.x_u.fetch(on_disk=self.on_disk))
        super().__init__(factory, backend_cfg, ctx, replace(shard, x_l=labeled[0],
                                                            y_l=labeled[1]))

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def memory(self) -> dict[str, Any]:
        """Where this actor keeps its shard and its memory now (raysl.memory)."""
        return {"rows": len(self.shard.x_u), "on_disk": self.on_disk,
                "memory": process_memory()}


class RayExecutor:
    """An :class:`~raysl.backends.base.Executor` over Ray actors; use it as a context manager."""

    def __init__(self, factory: BackendFactory, backend_cfg: Any, ctx: FitContext,
                 shards: list[Shard], num_cpus: float = 0.5, num_gpus: float = 0.0) -> None:
        # Restarted actors re-run the constructor (state reset) and retried calls re-send the
        # state, which is safe because ShardWorker is stateless between calls.
        # SPREAD: shards on as many nodes as there are, so a cluster fits in parallel.
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=2,
                               max_task_retries=2, scheduling_strategy="SPREAD")(_ShardActor)
        # The driver holds these refs for the executor's lifetime: a restarted actor re-reads
        # its constructor arguments, which must still exist (ray-project/ray#53727).
        # The labeled rows are put once, not once per shard: every shard has the same ones,
        # and each copy the driver writes into the store counts in its resident memory.
        labeled = (shards[0].x_l, shards[0].y_l) if shards else (None, None)
        if any(s.x_l is not labeled[0] or s.y_l is not labeled[1] for s in shards):
            raise ValueError("every shard must hold the same labeled arrays")
        self._refs = [ray.put(ctx), ray.put(labeled),
                      *[ray.put(replace(s, x_l=None, y_l=None)) for s in shards]]
        self._call: tuple[str, ray.ObjectRef] | None = None
        self.actors = [actor_cls.remote(factory, backend_cfg, self._refs[0], ref, self._refs[1])
                       for ref in self._refs[2:]]

    def stats(self, state: dict[str, Any]) -> list[Any]:
        ref = ray.put(state)
        return ray.get([a.stats.remote(ref) for a in self.actors])

    def predict(self, state: dict[str, Any]) -> list[np.ndarray]:
        ref = ray.put(state)
        return ray.get([a.predict.remote(ref) for a in self.actors])

    def _put(self, call: LabelCall) -> ray.ObjectRef:
        # label() and aligned() send the same call (the backend's whole state): put it once
        if self._call is None or self._call[0] != call.token:
            self._call = (call.token, ray.put(call))
        return self._call[1]

    def label(self, call: LabelCall, ys: list[np.ndarray]
              ) -> list[tuple[ShardLabels, ray.ObjectRef]]:
        """Each actor's summary (fetched) and a reference to its rows' columns, left in the
        object store (the driver holds references, not rows)."""
        ref = self._put(call)
        pairs = [a.label.options(num_returns=2).remote(ref, y)
                 for a, y in zip(self.actors, ys, strict=True)]
        summaries = ray.get([p[0] for p in pairs])
        return [(s, p[1]) for s, p in zip(summaries, pairs, strict=True)]

    def aligned(self, call: LabelCall, p_model: np.ndarray, prior: np.ndarray
                ) -> list[ray.ObjectRef]:
        ref = self._put(call)
        refs = [a.aligned.remote(ref, p_model, prior) for a in self.actors]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)  # done before the actors go
        return refs

    def memory(self) -> list[dict[str, Any]]:
        """Each actor's :meth:`_ShardActor.memory`."""
        return ray.get([a.memory.remote() for a in self.actors])

    def node_ids(self) -> list[str]:
        """The Ray node each shard's actor runs on."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors, self._refs, self._call = [], [], None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
