"""A test session's own Ray cluster, shared by tests/integration and tests/e2e.

`ray start --head` on 127.0.0.1 with free ports and its own temp dir (sage_ray.cluster), joined
by this process; stopped by that temp dir only, so a cluster the tests did not start is never
touched. Not `ray.init()`: it leaves the dashboard agent on Ray's fixed default port, so a
second test session on the machine would get a cluster that cannot run jobs. RAY_AUTH_MODE,
SAGE_HOME and a PATH starting with this interpreter's folder are set before the cluster starts,
so job drivers inherit them (Ray 2.60 turns token auth on for local clusters).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def session_cluster(home: Path) -> Iterator:
    """Start the cluster for SAGE_HOME `home`, join it, claim its registry; yield its ClusterInfo."""
    import ray

    from sage_ray.cluster import start_local_cluster, stop_local_cluster
    from sage_ray.registry import get_registry

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.setenv("SAGE_HOME", str(home))
        env.delenv("RAY_ADDRESS", raising=False)
        # `python` in a job's entrypoint must be this interpreter (the one with sage_ray installed)
        env.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        info = start_local_cluster(num_cpus=2, dashboard_port=free_port())
        try:
            ray.init(address=info.address, log_to_driver=False)
            # Claim the registry name for this session's SAGE_HOME at once: a process of another
            # test session that joins "auto" (the only cluster running) must not take it.
            get_registry(home)
            yield info
        finally:
            ray.shutdown()
            stop_local_cluster(info)
            shutil.rmtree(info.temp_dir, ignore_errors=True)
