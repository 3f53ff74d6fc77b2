"""The vLLM engine: AsyncLLM with LoRA enabled, adapters chosen per request (GPU only).

vLLM batches continuously on its own and applies each request's LoRA (LoRARequest) in
the same batch, so this module only converts requests and tracks adapters. vLLM is
imported inside functions: sage-ray installs and runs without it (`pip install
'sage-ray[vllm]'` adds it on a CUDA machine).

Written against vLLM's documented v1 API (vllm.v1.engine.async_llm.AsyncLLM:
from_engine_args, generate(prompt, sampling_params, request_id, lora_request=...),
add_lora, remove_lora, check_health, shutdown, get_tokenizer). Not run in CI here: there
is no GPU and vLLM ships CUDA-only wheels; the pure conversions below are unit-tested.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import uuid
from collections import Counter
from typing import AsyncIterator

from sage_ray.inference import encode_chat, stop_ids_from
from sage_ray.serve.engines.artifacts import adapter_config, adapter_tokenizer, check_adapter_folder
from sage_ray.serve.engines.artifacts import check_model_folder, folder_stamp
from sage_ray.serve.engines.base import BASE_ADAPTER, VLLM_EXTRA, Delta, EngineError, ModelSpec, SamplingParams

GPU_MEMORY_ENV = "SAGE_STUDIO_LLM_GPU_MEMORY"
DEFAULT_GPU_MEMORY = 0.85
# The LoRA ranks vLLM's kernels are built for; max_lora_rank must be one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def resolve_gpu_memory(value: float | None = None) -> float:
    """The fraction of GPU memory vLLM may take: the option, else $SAGE_STUDIO_LLM_GPU_MEMORY, else 0.85."""
    raw = value if value is not None else os.environ.get(GPU_MEMORY_ENV, DEFAULT_GPU_MEMORY)
    try:
        fraction = float(raw)
    except ValueError:
        raise EngineError(f"{GPU_MEMORY_ENV}={raw!r} is not a number: set a fraction such as 0.85") from None
    if not 0 < fraction <= 1:
        raise EngineError(f"gpu_memory_utilization must be in (0, 1], got {fraction}: e.g. 0.85 for 85%")
    return fraction


def lora_rank_limit(rank: int) -> int:
    """The smallest rank vLLM supports that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise EngineError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): retrain with a smaller r")


def engine_args(model_path: str, *, gpu_memory: float, max_loras: int, max_lora_rank: int, **extra) -> dict:
    """Keyword arguments for vllm's AsyncEngineArgs: LoRA on, the model folder's own tokenizer."""
    return {
        "model": model_path,
        "enable_lora": True,
        "max_loras": max_loras,
        "max_lora_rank": lora_rank_limit(max_lora_rank),
        "gpu_memory_utilization": gpu_memory,
        **extra,
    }


def sampling_kwargs(params: SamplingParams, stop_token_ids: list[int]) -> dict:
    """Keyword arguments for vllm.SamplingParams with the same meaning as the hf engine's."""
    return {
        "n": 1,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,  # 0 is greedy in vLLM too
        "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
        "stop": list(params.stop or []),
        "stop_token_ids": list(stop_token_ids),
        "seed": params.seed,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
    }


def finish_reason(reason: str | None) -> str:
    """vLLM's finish reasons ("stop", "length", "abort") as the protocol's ("stop" | "length")."""
    if reason == "length":
        return "length"
    if reason == "abort":
        raise EngineError("vLLM aborted the request (engine overloaded or shutting down); retry it")
    return "stop"


class VLLMEngine:
    """Engine on vLLM's AsyncLLM. Options: gpu_memory_utilization (default $SAGE_STUDIO_LLM_GPU_MEMORY
    or 0.85), max_loras (adapters in one batch, default 4), max_lora_rank (default 64), and any
    other AsyncEngineArgs field (max_model_len, dtype, tensor_parallel_size, enforce_eager...)."""

    name = "vllm"

    def __init__(self, *, gpu_memory_utilization: float | None = None, max_loras: int = 4,
                 max_lora_rank: int = 64, **engine_options) -> None:
        self.gpu_memory = resolve_gpu_memory(gpu_memory_utilization)
        self.max_loras = max_loras
        self.max_lora_rank = lora_rank_limit(max_lora_rank)
        self.engine_options = engine_options
        self._engine = None
        self._spec: ModelSpec | None = None
        self._base_path: str | None = None
        self._stamp: tuple = ()
        self._tokenizer = None
        self._stop_ids: list[int] = []
        # name -> (LoRARequest, tokenizer, stop ids, ModelSpec)
        self._adapters: dict[str, tuple[object, object, list[int], ModelSpec]] = {}
        self._default = BASE_ADAPTER
        self._ids = itertools.count(1)  # vLLM needs a unique int per adapter load
        self._counts = Counter()

    async def start(self, model: ModelSpec) -> None:
        """Serve `model`. vLLM takes a fixed share of GPU memory, so the old engine stops first;
        when the new model fails to load, the old one is started again before the error is raised.
        When the model folder is the one loaded already (unchanged), vLLM is not restarted: a lora
        spec is added as an adapter and becomes the default."""
        _require_vllm()
        path = check_model_folder(model)
        if model.kind == "lora":
            check_adapter_folder(model)
        if self._engine is not None and self._stamp == folder_stamp(path):
            if model.kind == "lora":
                await self.load_adapter(model)
            self._default = model.name if model.kind == "lora" else BASE_ADAPTER
            return
        previous = (self._spec, [entry[3] for entry in self._adapters.values()], self._default)
        await self._stop_engine()
        try:
            await self._start_engine(model, path)
        except Exception as error:
            await self._stop_engine()
            await self._restore(*previous, error=error)
            if isinstance(error, EngineError):
                raise
            raise EngineError(f"vLLM cannot serve {model.name!r} from {path}: {type(error).__name__}: {error}. "
                              "Check the folder, or lower max_model_len / free GPU memory.") from error

    async def _restore(self, previous: ModelSpec | None, adapters: list[ModelSpec], default: str, *,
                       error: Exception) -> None:
        """Serve again what was served before a failed start(): the model, its adapters, its default."""
        if previous is None:
            return
        try:
            await self._start_engine(previous, previous.full_model_path)
            for spec in adapters:
                await self.load_adapter(spec)
            self._default = default
        except Exception as restart_error:
            raise EngineError(f"loading the new model failed ({error}) and restarting {previous.name!r} failed "
                              f"too ({restart_error}): the engine serves nothing; start() a model") from error

    async def _start_engine(self, spec: ModelSpec, path: str) -> None:
        from transformers import GenerationConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        args = AsyncEngineArgs(**engine_args(path, gpu_memory=self.gpu_memory, max_loras=self.max_loras,
                                             max_lora_rank=self.max_lora_rank, **self.engine_options))
        self._engine = await asyncio.to_thread(_async_llm_class().from_engine_args, args)
        self._spec, self._base_path, self._stamp = spec, os.path.realpath(path), folder_stamp(path)
        self._tokenizer = self._engine.get_tokenizer()
        if inspect.isawaitable(self._tokenizer):  # async in vLLM releases before the v1 engine
            self._tokenizer = await self._tokenizer
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's eos is the stop
            generation_config = None
        self._stop_ids = stop_ids_from(generation_config, self._tokenizer)
        self._adapters, self._default = {}, BASE_ADAPTER
        if spec.kind == "lora":
            await self.load_adapter(spec)
            self._default = spec.name

    async def _stop_engine(self) -> None:
        engine, self._engine = self._engine, None
        self._adapters, self._base_path, self._stamp = {}, None, ()
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    async def load_adapter(self, spec: ModelSpec) -> None:
        """Register a LoRA adapter with vLLM (no base reload); a no-op when it is loaded already."""
        from vllm.lora.request import LoRARequest

        self._require_started()
        if spec.kind != "lora" or spec.name == BASE_ADAPTER:
            raise EngineError(f"{spec.name!r} is not a LoRA adapter spec: serve full models with start()")
        path = os.path.realpath(spec.path)
        if spec.name in self._adapters and self._adapters[spec.name][0].lora_path == path:
            return
        if spec.base_path and os.path.realpath(spec.base_path) != self._base_path:
            raise EngineError(f"adapter {spec.name!r} is for base {spec.base_path}, but this engine serves "
                              f"{self._base_path}: serve it with start() to switch the base")
        check_adapter_folder(spec)
        rank = int(adapter_config(path).get("r", 0))
        if rank > self.max_lora_rank:
            raise EngineError(f"adapter {spec.name!r} has rank {rank} > max_lora_rank {self.max_lora_rank}: "
                              f"restart the engine with max_lora_rank={lora_rank_limit(rank)}")
        request = LoRARequest(spec.name, next(self._ids), path)
        try:
            await self._engine.add_lora(request)
        except Exception as error:
            raise EngineError(f"vLLM cannot load adapter {spec.name!r} from {path}: {error}") from error
        older = self._adapters.pop(spec.name, None)  # the same name from another folder
        if older is not None:
            await self._engine.remove_lora(older[0].lora_int_id)
        tokenizer = adapter_tokenizer(path, self._tokenizer)
        self._adapters[spec.name] = (request, tokenizer, stop_ids_from(None, tokenizer) + self._stop_ids, spec)

    async def unload_adapter(self, name: str) -> None:
        """Drop an adapter (no-op for an unknown name)."""
        entry = self._adapters.pop(name, None)
        if self._default == name:
            self._default = BASE_ADAPTER
        if entry is not None and self._engine is not None:
            await self._engine.remove_lora(entry[0].lora_int_id)

    async def chat(self, messages: list[dict], *, adapter: str | None = None,
                   params: SamplingParams | None = None) -> AsyncIterator[Delta]:
        """Stream the reply: vLLM returns the cumulative text, the new part of it is sent."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        engine = self._require_started()
        params = params or SamplingParams()
        name = adapter or self._default
        lora, tokenizer, stop_ids = None, self._tokenizer, self._stop_ids
        if name != BASE_ADAPTER:
            if name not in self._adapters:
                raise EngineError(f"adapter {name!r} is not loaded (loaded: {sorted(self._adapters) or 'none'}); "
                                  "load it with load_adapter() first")
            lora, tokenizer, stop_ids, _ = self._adapters[name]
        prompt = encode_chat(tokenizer, messages)
        sampling = VLLMSamplingParams(**sampling_kwargs(params, stop_ids))
        sent = ""
        async for output in engine.generate(TokensPrompt(prompt_token_ids=prompt), sampling, uuid.uuid4().hex,
                                            lora_request=lora):
            completion = output.outputs[0]
            piece, sent = completion.text[len(sent):], completion.text
            if output.finished:
                self._counts["requests_served"] += 1
                self._counts["tokens_generated"] += len(completion.token_ids)
                yield Delta(piece, finish_reason(completion.finish_reason), len(prompt), len(completion.token_ids))
                return
            if piece:
                yield Delta(piece)

    async def check_health(self) -> None:
        engine = self._require_started()
        try:
            await engine.check_health()
        except Exception as error:
            raise EngineError(f"vLLM is not healthy ({type(error).__name__}: {error}); restart the replica") from error

    def stats(self) -> dict:
        return {
            "engine": self.name,
            "base_path": self._base_path,
            "adapters": self.adapters,
            "default_adapter": self._default if self._engine else None,
            "device": "cuda",
            "gpu_memory_utilization": self.gpu_memory,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "requests_served": self._counts["requests_served"],
            "tokens_generated": self._counts["tokens_generated"],
            "batch_sizes": None,  # vLLM schedules continuously; see its own metrics (num_requests_running)
        }

    async def shutdown(self) -> None:
        await self._stop_engine()
        self._spec = None

    @property
    def base_path(self) -> str | None:
        return self._base_path

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _require_started(self):
        if self._engine is None:
            raise EngineError("the vLLM engine serves no model yet: call start(ModelSpec(...)) first")
        return self._engine


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise EngineError(f"the vllm engine needs vLLM (CUDA GPU only): {VLLM_EXTRA}, or use the 'hf' engine") from error


def _async_llm_class():
    """vLLM's async engine: AsyncLLM (v1); older releases export it as AsyncLLMEngine."""
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:
        from vllm import AsyncLLMEngine as AsyncLLM
    return AsyncLLM
