"""Starting or joining Ray."""

from __future__ import annotations

import os

from raysl.config import RayConfig

# Quieter, readable logs: each worker print once, not twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


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
        ray.init(num_cpus=cfg.num_cpus or None, **kwargs)
    return True
