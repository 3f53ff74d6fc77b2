"""What the engine tests share: the vLLM availability rule."""

from __future__ import annotations

import os

import pytest


def require_vllm() -> None:
    """Skip a vLLM test where vLLM is not installed, except under `make test` and CI, which
    install it (make install-vllm): there a missing vLLM fails the test instead."""
    from sage_ray.utils import is_available

    if is_available("vllm"):
        return
    message = "vLLM is not installed: run `make install-vllm`"
    if os.environ.get("CI") or os.environ.get("SAGE_REQUIRE_VLLM"):
        pytest.fail(message)
    pytest.skip(message)
