"""The integration tests' data; their Ray cluster is the session's (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart"


@pytest.fixture(scope="session")
def chat_data() -> Path:
    """Real multi-turn conversations shipped with the package."""
    return QUICKSTART / "chat.json"


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on a free 127.0.0.1 port (real HTTP, not a client mock);
    stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()

