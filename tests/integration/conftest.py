"""One real local Ray cluster for the whole integration session, started and stopped here.

It has its own temp dir and ports, all on 127.0.0.1, so it never touches a cluster it did not
start; auth is disabled consistently for it and for the `ray job submit` it serves
(Ray 2.60 turns token auth on for local clusters).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart"


@dataclass
class RayCluster:
    address: str
    dashboard_url: str
    sage_home: Path
    temp_dir: str  # every process of this cluster names it on its command line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """`ray start --head` on 127.0.0.1 with free ports (sage_ray.cluster), joined by this process.

    Not `ray.init()`: it leaves the dashboard agent on Ray's fixed default port, so a second
    test session on the machine would get a cluster that cannot run jobs."""
    import ray

    from sage_ray.cluster import start_local_cluster, stop_local_cluster
    from sage_ray.registry import get_registry

    home = tmp_path_factory.mktemp("sage_home")
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
            yield RayCluster(info.address, info.dashboard_url, home, info.temp_dir)
        finally:
            ray.shutdown()
            stop_local_cluster(info)
            shutil.rmtree(info.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def chat_data() -> Path:
    """Real multi-turn conversations shipped with the package."""
    return QUICKSTART / "chat.json"
