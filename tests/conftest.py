"""Fixtures shared by every test folder: an isolated $SAGE_HOME and the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest


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
