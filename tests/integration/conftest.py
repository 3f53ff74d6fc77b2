"""One real local Ray cluster for the whole integration session, started and stopped here.

It has its own temp dir and dashboard port, so it never touches a cluster it did not
start; auth is disabled consistently for it and for the `ray job submit` it serves
(Ray 2.60 turns token auth on for local clusters).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart"


@dataclass
class RayCluster:
    address: str
    dashboard_url: str
    sage_home: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    import ray

    home = tmp_path_factory.mktemp("sage_home")
    temp_dir = tempfile.mkdtemp(prefix="sgr", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.setenv("SAGE_HOME", str(home))
        # `python` in a job's entrypoint must be this interpreter (the one with sage_ray installed)
        env.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        info = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                        _temp_dir=temp_dir, log_to_driver=False)
        try:
            yield RayCluster(info.address_info["address"], f"http://127.0.0.1:{port}", home)
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def chat_data() -> Path:
    """Real multi-turn conversations shipped with the package."""
    return QUICKSTART / "chat.json"
