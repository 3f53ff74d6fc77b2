"""The integration tests' data; their Ray cluster is the session's (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart"


@pytest.fixture(scope="session")
def chat_data() -> Path:
    """Real multi-turn conversations shipped with the package."""
    return QUICKSTART / "chat.json"
