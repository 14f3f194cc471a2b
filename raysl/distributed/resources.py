"""Resource requests checked against the cluster before any job waits on them.

Ray queues a request it cannot place and waits for ever (a Train worker group asks again every
few seconds; an actor simply stays pending). So what a run will ask for is compared with what
Ray reports now, and a request that can never be met is an error naming the keys.
"""

from __future__ import annotations

import socket
from typing import Any

from raysl.config import Config
from raysl.errors import ConfigError


def node_resources() -> list[dict[str, float]]:
    """The total resources of each alive Ray node."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: Config, nodes: list[dict[str, Any]] | None = None) -> None:
    """Raise ConfigError when the Train workers or the shard actors ``cfg`` asks for can never
    be placed on ``nodes`` (default: the connected cluster's)."""
    nodes = node_resources() if nodes is None else nodes
    cpus = [float(n.get("CPU", 0.0)) for n in nodes]
    gpus = [float(n.get("GPU", 0.0)) for n in nodes]
    t, b = cfg.train, cfg.backend
    workers = max(t.num_workers, 0)
    if workers:
        # each worker needs its CPUs on one node; the group needs them all at once
        per_node = sum(int((c + 1e-9) // t.cpus_per_worker) for c in cpus)
        if per_node < workers:
            raise ConfigError(
                f"train.num_workers={t.num_workers} × train.cpus_per_worker="
                f"{t.cpus_per_worker}: the Ray cluster has {_fmt(cpus)} CPUs "
                f"({len(cpus)} node(s)), room for {per_node} such worker(s); lower "
                "train.num_workers or train.cpus_per_worker (0 runs in the driver)")
        if t.use_gpu and sum(int(g) for g in gpus) < workers:
            raise ConfigError(
                f"train.use_gpu=true with train.num_workers={t.num_workers}: the Ray cluster "
                f"has {_fmt(gpus)} GPUs; one GPU per worker is needed (or train.use_gpu=false)")
    if cpus and b.actor_cpus > max(cpus) + 1e-9:
        raise ConfigError(
            f"backend.actor_cpus={b.actor_cpus}: no Ray node has that many CPUs (largest: "
            f"{max(cpus):g}); a shard actor could never start")


def _fmt(values: list[float]) -> str:
    return f"{sum(values):g}"


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """For a ``host:port`` address: raise ConfigError unless a TCP connection opens within
    ``timeout`` seconds (``ray.init`` would retry for minutes). Other forms ("auto", "local",
    ``ray://``) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not (host and sep and port.isdigit()) or "://" in address:
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"ray.address={address!r}: no Ray head answers there within "
                          f"{timeout:g} s ({e.strerror or e}); start one with `ray start "
                          "--head`, or leave ray.address empty to start a local Ray") from None
