"""Starting or joining Ray.

Importing this module changes nothing. The settings raysl wants in Ray's own processes go in
the job's ``runtime_env`` (:func:`runtime_env`), which every task and actor of the job
inherits, Ray Train's controller and workers included (a child's ``env_vars`` are merged into
its parent's key by key), on a local Ray as on a cluster it joins.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from raysl.config import RayConfig

# Read in Ray's processes, never in the driver: RAY_TRAIN_ENABLE_PRINT_PATCH by each Train
# worker (ray/train/v2/_internal/logging/patch_print.py, patch_print_function), the interval
# by the Train controller actor (ray/train/v2/_internal/execution/controller/controller.py,
# TrainController.__init__). A variable already set in the driver's environment wins: the
# job's runtime_env leaves it out, and Ray Train forwards it from the driver itself
# (ENV_VARS_TO_PROPAGATE in ray/train/v2/_internal/constants.py).
RAY_ENV: dict[str, str] = {
    # Each worker print once, not twice (the patch re-logs every print through Train's logger).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # ray.train.report() waits for the Train controller's next poll (every 2 s by default),
    # which made a 0.4 s epoch cost 2.4 s here.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def runtime_env(*, address: str | None = None, api_server: str | None = None) -> dict[str, Any]:
    """The job-level ``runtime_env`` raysl starts or joins Ray with: :data:`RAY_ENV` (less the
    variables the driver's environment already sets), and where Ray's own processes find this
    cluster.

    Ray Train's PlacementGroupCleaner (a detached actor on the head node) looks the controller
    up through the State API with no address (``ray.util.state.get_actor``), so it finds "the"
    Ray on its machine: ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else the last
    ``ray start`` or the only GCS process running. With a second Ray on the machine it either
    dies on ``ConnectionError: Found multiple active Ray instances`` or asks the other cluster,
    and then no longer cleans up a run whose controller dies. ``address`` (a GCS host:port this
    process joins) and ``api_server`` (this Ray's dashboard URL) pin it to this cluster."""
    env = {k: v for k, v in RAY_ENV.items() if k not in os.environ}
    if address and _is_gcs_address(address):
        env["RAY_ADDRESS"] = address
    if api_server:
        env["RAY_API_SERVER_ADDRESS"] = api_server
    return {"env_vars": env}


def start_local(num_cpus: int | None = None, **init_kwargs: Any) -> Any:
    """Start a new local Ray of our own, never a stray cluster found on this machine, with
    :func:`runtime_env`; its dashboard (the State API) on a free loopback port, which the job's
    processes are pointed at. ``init_kwargs`` go to ``ray.init``. Returns its context."""
    import ray

    port = _free_port()
    return ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    runtime_env=runtime_env(api_server=f"http://127.0.0.1:{port}"),
                    **init_kwargs)


def ensure_ray(cfg: RayConfig) -> bool:
    """Join the running Ray session, the one at ``cfg.address`` / RAY_ADDRESS, or start a local
    one (bound to loopback). Returns True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": True,
                              "logging_level": "WARNING"}
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        from raysl.distributed.resources import check_reachable

        check_reachable(address)  # ray.init would retry an unreachable head for minutes
        ray.init(address=address, runtime_env=runtime_env(address=address), **kwargs)
    else:
        # "local": always a new Ray of our own, never a stray cluster found on this machine
        # (set ray.address=auto to join one started with `ray start`).
        start_local(cfg.num_cpus or None, **kwargs)
    return True


def _is_gcs_address(address: str) -> bool:
    """host:port, the form Ray's processes can be pointed at ("auto", "local" and ray:// or
    http:// addresses are not)."""
    host, sep, port = address.rpartition(":")
    return bool(host) and bool(sep) and port.isdigit() and "://" not in address


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
