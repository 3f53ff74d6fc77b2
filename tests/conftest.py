"""Fixtures shared by every test folder: an isolated $SAGE_HOME, the tiny and demo models, and
the session's one local Ray cluster (started on first use by an integration or e2e test)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ray_cluster import session_cluster


@dataclass
class RayCluster:
    address: str
    dashboard_url: str
    sage_home: Path
    temp_dir: str  # every process of this cluster names it on its command line


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The session's own local Ray cluster (tests/ray_cluster.py), one for every folder."""
    home = tmp_path_factory.mktemp("sage_home")
    with session_cluster(home) as info:
        yield RayCluster(info.address, info.dashboard_url, home, info.temp_dir)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (e.g. the demo model conversion)")


@pytest.fixture
def sage_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $SAGE_HOME at a fresh folder so a test never touches ~/.sage."""
    home = tmp_path / "sage_home"
    monkeypatch.setenv("SAGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 chat model folder, built once per test session (~2 s)."""
    from sage_ray.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (the demo model), converted from its GGUF once per test session (~20 s).
    A real chat model: it ends its turn by itself, and vLLM runs it on CPU (the tiny model's
    head size of 16 has no vLLM CPU attention kernel)."""
    from sage_ray.models import ensure_demo_model

    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAGE_HOME", str(tmp_path_factory.mktemp("demo_home")))
        return ensure_demo_model(progress=False)

