"""Starting or joining Ray."""

from __future__ import annotations

import os

from raysl.config import RayConfig

# Quieter, readable logs: each worker print once, not twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# ray.train.report() waits for the Train controller's next poll (every 2 s by default), which
# made a 0.4 s epoch cost 2.4 s here. A local Ray started by raysl inherits this environment;
# on a cluster, set it in the nodes' environment (cluster.yaml) to the same effect.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def ensure_ray(cfg: RayConfig) -> bool:
    """Join the running Ray session, the one at ``cfg.address`` / RAY_ADDRESS, or start a local
    one (bound to loopback). Returns True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, object] = {"log_to_driver": True, "configure_logging": True,
                                 "logging_level": "WARNING"}
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": always a new Ray of our own, never a stray cluster found on this machine
        # (set ray.address=auto to join one started with `ray start`).
        ray.init(address="local", num_cpus=cfg.num_cpus or None, **kwargs)
    return True
