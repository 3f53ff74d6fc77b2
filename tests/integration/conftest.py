"""One real local Ray cluster for the whole integration session, started and stopped here
(tests/ray_cluster.py says how), and the shipped datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ray_cluster import free_port, session_cluster  # noqa: F401  (free_port: imported by tests)

QUICKSTART = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart"


@dataclass
class RayCluster:
    address: str
    dashboard_url: str
    sage_home: Path
    temp_dir: str  # every process of this cluster names it on its command line


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The session's own local Ray cluster (tests/ray_cluster.py)."""
    home = tmp_path_factory.mktemp("sage_home")
    with session_cluster(home) as info:
        yield RayCluster(info.address, info.dashboard_url, home, info.temp_dir)


@pytest.fixture(scope="session")
def chat_data() -> Path:
    """Real multi-turn conversations shipped with the package."""
    return QUICKSTART / "chat.json"
