"""End-to-end browser tests: a real local Ray cluster, the Studio config-deployed on it with
the tiny model and the web UI, and headless Chromium driven by Playwright.

The cluster is the test session's one (`ray_cluster` in tests/conftest.py); the Studio and
the browser live for this module only, so the sync Playwright loop is gone before any later
test runs asyncio.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ray_cluster import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SAGE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
APP = "studio"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: drives the Studio web UI in headless Chromium on a real Ray cluster")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots go here: $SAGE_TEST_ARTIFACTS, else tests/e2e/artifacts (git-ignored)."""
    folder = Path(os.environ.get("SAGE_TEST_ARTIFACTS") or REPO / "tests" / "e2e" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def studio_url(request) -> str:
    """The Studio under test: $SAGE_TEST_STUDIO_URL (one already running with model "tiny",
    for working on the tests), else a fresh one on this session's own cluster."""
    if os.environ.get("SAGE_TEST_STUDIO_URL"):
        return os.environ["SAGE_TEST_STUDIO_URL"].rstrip("/")
    return request.getfixturevalue("deployed_studio")


@pytest.fixture(scope="module")
def deployed_studio(ray_cluster):
    """The Studio (tiny model, transformers engine, web UI) config-deployed on the cluster."""
    from ray import serve

    from sage_ray.serve.deploy import deploy_studio
    from sage_ray.serve.settings import StudioSettings

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = StudioSettings(sage_home=str(ray_cluster.sage_home), model="tiny", engine="hf", ui=True)
    deploy_studio(settings, port=port, app_name=APP, timeout_s=300)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()  # the cluster is the session's: leave it without a Studio for the next module


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium; a missing browser fails the test and says how to install it."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: install it with "
                    "`sudo apt-get install chromium` (or `make browser`), or point SAGE_TEST_CHROMIUM at one",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    yield page
    context.close()
