"""The transformers + peft engine: one base model, many LoRA adapters, dynamic batching.

Runs anywhere torch runs (fp32 on CPU, bf16/fp16 on a GPU). Adapters are injected into
the loaded base with peft and chosen per request (peft mixed-adapter batches), so
switching adapters never reloads the base. Requests that arrive while a batch runs wait
in a queue and form the next batch; one worker thread owns the model (see hf_batch).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import queue
import threading
import time
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from sage_ray.inference import stop_token_ids
from sage_ray.serve.engines.artifacts import adapter_tokenizer, check_adapter_folder, check_model_folder
from sage_ray.serve.engines.artifacts import folder_stamp
from sage_ray.serve.engines.devices import free_memory, pad_id, pick_dtype
from sage_ray.serve.engines.base import BASE_ADAPTER, OPENAI_SAMPLING, ChatAndPrompt, Delta, EngineError, ModelSpec
from sage_ray.serve.engines.base import SamplingParams
from sage_ray.serve.engines.grammar import TokenViews
from sage_ray.serve.engines.hf_batch import Request, run_batch

_STOP = object()  # tells the worker thread to exit


@dataclass
class _Adapter:
    path: str
    tokenizer: object
    stop_ids: list[int]


@dataclass
class _Served:
    """What the engine serves now; replaced as a whole by start(), so a failed load changes nothing."""

    base_path: str
    model: object
    """The transformers model; stays the same object while adapters come and go."""
    tokenizer: object
    stop_ids: list[int]
    context: int
    pad_id: int
    peft: object | None = None
    """The PeftModel wrapping `model` once an adapter is loaded."""
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    default_adapter: str = BASE_ADAPTER
    """What a request without `adapter` gets: the adapter of a lora spec given to start(), else the base."""
    stamp: tuple = ()
    """folder_stamp of the base folder when it was loaded."""
    token_views: TokenViews | None = None  # JSON-schema matchers and token bytes (logprobs)


class HFEngine(ChatAndPrompt):
    """Engine on transformers + peft. Options: device ("cpu", "cuda", "cuda:1"; default: cuda when present),
    dtype ("float32", "bfloat16", "float16"; default: fp32 on CPU, bf16 or fp16 on GPU),
    max_batch_size (requests per generate call), batch_wait_ms (how long an idle engine waits
    for more requests to batch with the first one), threads (torch CPU threads for this
    process; default: torch's own, i.e. the cores Ray or OMP_NUM_THREADS allow)."""

    name = "hf"
    sampling_fields = OPENAI_SAMPLING
    serves_asleep = True  # asleep it answers from the CPU, slower

    def __init__(self, *, device: str | None = None, dtype: str | None = None, max_batch_size: int = 16,
                 batch_wait_ms: float = 5.0, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.home_device = self.device  # where wake() moves the model back to
        self.dtype = pick_dtype(self.device, dtype)
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000
        self._served: _Served | None = None
        self._lock = threading.Lock()  # held while a batch runs or the model/adapters change
        self._pending: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._counts = Counter()
        self._batch_sizes = Counter()
        self._last_error: str | None = None

    # --- loading ---------------------------------------------------------------------------

    async def start(self, model: ModelSpec) -> None:
        """Serve `model`. The new model loads beside the old one, which serves until the swap.

        When its full model folder is the one loaded already (unchanged on disk), nothing is
        reloaded: a lora spec is added as an adapter and becomes the default, a base spec
        makes the base weights the default.
        """
        if model.kind == "lora":
            check_adapter_folder(model)
        if self._served is not None and self._served.stamp == folder_stamp(check_model_folder(model)):
            if model.kind == "lora":
                await self.load_adapter(model)
            self._served.default_adapter = model.name if model.kind == "lora" else BASE_ADAPTER
            return
        served = await asyncio.to_thread(self._load, model)
        self._counts["base_loads"] += 1
        old = await asyncio.to_thread(self._locked, self._swap, served)
        del old
        free_memory(self.device)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name="sage-hf-engine", daemon=True)
            self._worker.start()
            # A worker still inside torch when the interpreter exits aborts the process
            # ("terminate called without an active exception"): stop it first.
            engine = weakref.ref(self)
            atexit.register(lambda: engine() is not None and engine()._stop_worker(timeout=10))

    def _swap(self, served: _Served) -> _Served | None:
        old, self._served = self._served, served
        return old

    def _load(self, spec: ModelSpec) -> _Served:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = check_model_folder(spec)
        try:
            placement = {"device_map": str(self.device)} if self.device.type != "cpu" else {}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **placement).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as error:  # transformers raises many types for a bad folder
            raise EngineError(f"cannot load model {path} for {spec.name!r}: {type(error).__name__}: {error}. "
                              "Check that the folder holds a complete transformers model.") from error
        config = model.config
        served = _Served(
            base_path=os.path.realpath(path), model=model, tokenizer=tokenizer,
            stop_ids=stop_token_ids(model, tokenizer),
            context=getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length,
            pad_id=pad_id(tokenizer, model), stamp=folder_stamp(path),
            token_views=TokenViews(model.get_output_embeddings().weight.shape[0]),
        )
        if spec.kind == "lora":
            self._attach(served, spec)
            served.default_adapter = spec.name
        return served

    async def load_adapter(self, spec: ModelSpec) -> None:
        """Add a LoRA adapter of the loaded base (no base reload); a no-op when it is loaded already."""
        served = self._require_started()
        if spec.kind != "lora":
            raise EngineError(f"{spec.name!r} is a full model (kind {spec.kind!r}), not an adapter: serve it with start()")
        if spec.name == BASE_ADAPTER:
            raise EngineError(f"{BASE_ADAPTER!r} is reserved for the base model: give the adapter another name")
        loaded = served.adapters.get(spec.name)
        if loaded and loaded.path == os.path.realpath(spec.path):
            return
        if spec.base_path and os.path.realpath(spec.base_path) != served.base_path:
            raise EngineError(f"adapter {spec.name!r} is for base {spec.base_path}, but this engine serves "
                              f"{served.base_path}: serve it with start() to switch the base")
        check_adapter_folder(spec)
        await asyncio.to_thread(self._locked, self._attach, served, spec)

    def _attach(self, served: _Served, spec: ModelSpec) -> None:
        """Inject the adapter into the served model (caller holds the lock or owns `served` alone)."""
        from peft import PeftConfig, PeftModelForCausalLM

        path = os.path.realpath(spec.path)
        try:
            config = PeftConfig.from_pretrained(path)
            if config.peft_type != "LORA":
                raise EngineError(f"{path} is a {config.peft_type} adapter; only LoRA adapters can be served")
            tokenizer = adapter_tokenizer(path, served.tokenizer)
            if spec.name in served.adapters:  # same name, new folder: replace it
                served.peft.delete_adapter(spec.name)
                del served.adapters[spec.name]
            if served.peft is None:
                config.inference_mode = True
                served.peft = PeftModelForCausalLM(served.model, config, adapter_name=spec.name,
                                                   low_cpu_mem_usage=True)
            served.peft.load_adapter(path, adapter_name=spec.name, is_trainable=False, low_cpu_mem_usage=True)
        except Exception as error:
            self._drop_adapter(served, spec.name)
            if isinstance(error, EngineError):
                raise
            raise EngineError(f"cannot load LoRA adapter {spec.name!r} from {path}: {type(error).__name__}: "
                              f"{error}. Check that it was trained on {served.base_path}.") from error
        served.peft.eval()
        served.adapters[spec.name] = _Adapter(path, tokenizer, stop_token_ids(served.model, tokenizer))

    async def unload_adapter(self, name: str) -> None:
        """Drop an adapter (no-op for an unknown name); requests still waiting for it fail."""
        served = self._require_started()
        if name in served.adapters:
            await asyncio.to_thread(self._locked, self._drop_adapter, served, name)

    def _drop_adapter(self, served: _Served, name: str) -> None:
        with warnings.catch_warnings():  # peft warns that another adapter becomes "active": none is used
            warnings.simplefilter("ignore", UserWarning)
            self._drop_adapter_quietly(served, name)

    def _drop_adapter_quietly(self, served: _Served, name: str) -> None:
        served.adapters.pop(name, None)
        if served.default_adapter == name:
            served.default_adapter = BASE_ADAPTER
        if served.peft is None:
            return
        if name in served.peft.peft_config:
            if len(served.peft.peft_config) > 1:
                served.peft.delete_adapter(name)
                return
        if not served.adapters:
            # Last adapter gone: take the LoRA layers out again (the base modules are the same objects).
            served.model = served.peft.unload()
            served.peft = None

    # --- serving ---------------------------------------------------------------------------

    async def _generate(self, messages: list[dict], prompt: str | None, adapter: str | None, params) -> AsyncIterator:
        served = self._require_started()
        name = adapter or served.default_adapter
        if name != BASE_ADAPTER and name not in served.adapters:
            raise EngineError(f"adapter {name!r} is not loaded (loaded: {sorted(served.adapters) or 'none'}); "
                              "load it with load_adapter() first")
        request = Request(messages, name, params or SamplingParams(), asyncio.get_running_loop(), asyncio.Queue(),
                          on_finish=self._count_finished, prompt=prompt)
        self._pending.put(request)
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            request.cancelled = True  # a client that stops reading frees its batch row

    def _loop(self) -> None:
        """Worker thread: take every waiting request (up to max_batch_size) and run them as one batch."""
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self._lock:
                self._run(batch)

    def _next_batch(self) -> list[Request] | None:
        first = self._pending.get()
        if first is _STOP:
            return None
        batch, deadline = [first], time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._pending.get(timeout=max(deadline - time.monotonic(), 1e-4))
            except queue.Empty:
                break
            if item is _STOP:
                self._pending.put(_STOP)  # finish this batch, then exit
                break
            batch.append(item)
        return [r for r in batch if not r.cancelled]

    def _run(self, batch: list[Request]) -> None:
        served, ready = self._served, []
        for request in batch:
            try:
                self._prepare(served, request)
                ready.append(request)
            except Exception as error:
                self._counts["requests_failed"] += 1
                request.fail(error if isinstance(error, EngineError) else EngineError(f"bad request: {error}"))
        if not ready:
            return
        names = [r.adapter for r in ready] if served.peft is not None else None
        self._batch_sizes[len(ready)] += 1
        self._counts["batches"] += 1
        started = time.perf_counter()
        try:
            run_batch(served.peft or served.model, ready, pad_id=served.pad_id, adapter_names=names,
                      device=self.device)
        except Exception as error:
            self._last_error = f"{type(error).__name__}: {error}"
            self._counts["requests_failed"] += len(ready)
            for request in ready:
                request.fail(EngineError(f"generation failed: {self._last_error}"))
            return
        self._counts["generate_ms"] += int((time.perf_counter() - started) * 1000)

    def _count_finished(self, request: Request) -> None:
        self._counts["requests_served"] += 1
        self._counts["tokens_generated"] += request.completion_tokens

    def _prepare(self, served: _Served, request: Request) -> None:
        if request.adapter == BASE_ADAPTER:
            tokenizer, stop_ids = served.tokenizer, served.stop_ids
        elif request.adapter in served.adapters:
            adapter = served.adapters[request.adapter]
            tokenizer, stop_ids = adapter.tokenizer, adapter.stop_ids
        else:
            raise EngineError(f"adapter {request.adapter!r} was unloaded before this request ran; "
                              f"loaded: {sorted(served.adapters) or 'none'}")
        request.prepare(tokenizer, stop_ids, served.context, served.token_views)

    # --- state -----------------------------------------------------------------------------

    async def check_health(self) -> None:
        self._require_started()
        if self._worker is None or not self._worker.is_alive():
            raise EngineError("the generation thread has stopped; restart the replica "
                              f"(last error: {self._last_error or 'none'})")

    def stats(self) -> dict:
        served = self._served
        return {
            "engine": self.name,
            "base_path": served.base_path if served else None,
            "adapters": sorted(served.adapters) if served else [],
            "default_adapter": served.default_adapter if served else None,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "base_loads": self._counts["base_loads"],
            "requests_served": self._counts["requests_served"],
            "requests_failed": self._counts["requests_failed"],
            "tokens_generated": self._counts["tokens_generated"],
            "batches": self._counts["batches"],
            "batch_sizes": dict(sorted(self._batch_sizes.items())),
            "max_batch_size": self.max_batch_size,
            "queue_depth": self._pending.qsize(),
            "generate_s": self._counts["generate_ms"] / 1000,
            "last_error": self._last_error,
        }

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._stop_worker, timeout=60)
        while not self._pending.empty():  # requests that never ran
            item = self._pending.get_nowait()
            if isinstance(item, Request):
                item.fail(EngineError("the engine shut down before this request ran; retry on another replica"))
        self._served = None
        free_memory(self.device)

    async def sleep(self) -> None:
        """Leave the GPU: the model moves to the CPU and keeps answering there (before start:
        it loads there). Requests keep flowing on whichever device the model is on."""
        await asyncio.to_thread(self._locked, self._move, torch.device("cpu"))

    async def wake(self) -> None:
        await asyncio.to_thread(self._locked, self._move, self.home_device)

    def _move(self, target: torch.device) -> None:
        if self._served is not None and self.device != target:
            self._served.model.to(target)
        self.device, left = target, self.device  # the next batch's inputs follow the model
        free_memory(left)

    def _stop_worker(self, *, timeout: float) -> None:
        worker, self._worker = self._worker, None
        if worker is not None and worker.is_alive():
            self._pending.put(_STOP)
            worker.join(timeout)

    @property
    def base_path(self) -> str | None:
        return self._served.base_path if self._served else None

    @property
    def adapters(self) -> list[str]:
        return sorted(self._served.adapters) if self._served else []

    @property
    def base_model(self):
        """The loaded transformers model (the same object while adapters are loaded and unloaded)."""
        return self._served.model if self._served else None

    def _require_started(self) -> _Served:
        if self._served is None:
            raise EngineError("the engine serves no model yet: call start(ModelSpec(...)) first")
        return self._served

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)
