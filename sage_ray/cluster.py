"""Joining or starting the Ray cluster every entry point works against."""

from __future__ import annotations

import os


def connect(address: str | None = None, *, log_to_driver: bool = True) -> None:
    """Connect this process to Ray: an explicit address, `RAY_ADDRESS`, or a new local cluster.

    Inside `ray job submit` RAY_ADDRESS is set, so the job joins the cluster it was sent to;
    from a shell with no cluster running, a local one starts and stops with the process.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
