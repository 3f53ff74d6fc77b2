"""LLM engines behind the Studio's LLM deployment: one protocol, an hf and a vllm engine.

    from sage_ray.serve.engines import ModelSpec, SamplingParams, create_engine
    engine = create_engine("auto")            # vllm with a CUDA GPU and vllm installed, else hf
    await engine.start(ModelSpec("demo", "/path/to/model", "base"))
    async for delta in engine.chat([{"role": "user", "content": "Hi"}]): print(delta.text, end="")

Importing this package is cheap: the engines (torch, transformers, vLLM) load on create_engine.
"""

from sage_ray.serve.engines.base import (
    BASE_ADAPTER,
    Delta,
    Engine,
    EngineError,
    ModelSpec,
    SamplingParams,
    adapter_base,
    complete,
    create_engine,
    vllm_usable,
)

__all__ = [
    "BASE_ADAPTER",
    "Delta",
    "Engine",
    "EngineError",
    "ModelSpec",
    "SamplingParams",
    "adapter_base",
    "complete",
    "create_engine",
    "vllm_usable",
]
