"""What the engine tests share: the vLLM availability rule, one torch thread."""

from __future__ import annotations

import os
from contextlib import contextmanager

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


@contextmanager
def one_torch_thread():
    """One torch thread in this process while it trains or generates beside an engine (each engine
    gets one core of two): measured on a busy 2-core machine, 2 threads made a LoRA training step
    20 times slower, spin-waiting for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
