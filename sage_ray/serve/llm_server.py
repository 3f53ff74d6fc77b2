"""LLMServer: the Serve deployment that answers chats and hot-swaps models by `reconfigure`.

The declared model lives in the deployment's `user_config` as one (ref, version) record; a
config deploy that changes it calls `reconfigure` on every replica in place (no restart), and
the Studio's switch may also `declare` it straight to a single replica first. A LoRA adapter of
the loaded base switches without touching the base; another full model loads in the
background while the old one keeps answering, then the active pointer moves in one step. A
model that fails to load leaves the old one serving and its error on record. A restarted
replica runs `reconfigure` with the declared config and so comes back with the declared model.

    starting --declare(ref, v)--> loading --loaded--> active --declare(ref2, v2 >= v)--> loading
                                     |                  ^
                                     +--load failed-----+  (old model kept, error set)
                                     +--load failed, nothing loaded--> failed --declare--> loading
    active | loading --release_gpu, engine cannot serve asleep--> lent --reclaim_gpu--> loading
    A declaration with an older version than the one in force is stale and ignored.

Under a Studio gpu_policy of "release" a fine-tune borrows the replica's GPU
(sage_ray.serve.gpu_lending): the engines sleep (the transformers engine keeps answering from
the CPU) and wake once no job borrows it. Engines come from the `engine_factory` given at
construction (the Studio's settings by default; unit tests pass a fake).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import OrderedDict
from dataclasses import asdict
from typing import Any, AsyncIterator, Callable

from ray import serve

from sage_ray.errors import SageError
from sage_ray.serve.canary import Canary
from sage_ray.serve.engines.base import Engine, ModelSpec, SamplingParams, vllm_usable
from sage_ray.serve.gpu_lending import GpuLoans
from sage_ray.serve.settings import LLM_DEPLOYMENT, StudioSettings

log = logging.getLogger("ray.serve")
DECLARE_WAIT_S = 5.0
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "repetition_penalty", "stop", "seed", "presence_penalty",
                   "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "json_schema", "tools")


class ModelUnavailableError(SageError, RuntimeError):
    """No model can answer: none loaded yet, or the requested one failed to load."""

    http_status = 503


class PromptTooLongError(SageError, ValueError):
    """A prompt over the Studio's max_prompt_chars, refused before it is tokenized."""


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """The text a chat sends: string contents and the text of content parts."""
    total = 0
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        total += sum(len(p if isinstance(p, str) else str((p or {}).get("text") or "")) for p in parts)
    return total


class GpuLentError(ModelUnavailableError):
    """The GPU is lent to a fine-tune and this engine cannot serve without it."""


EngineFactory = Callable[[dict[str, Any]], Engine]


def studio_engines(settings: StudioSettings) -> EngineFactory:
    """The engines the Studio's settings ask for; options are those of the declared config."""
    from sage_ray.serve.engines import create_engine

    kind = settings.engine if settings.engine != "auto" else ("vllm" if vllm_usable() else "hf")

    def make(options: dict[str, Any]) -> Engine:
        if kind == "vllm":
            return create_engine(kind, gpu_memory_utilization=options.get("gpu_memory_utilization"))
        return create_engine(kind, threads=hf_threads(settings))

    return make


def hf_threads(settings: StudioSettings) -> int:
    if settings.llm_threads:
        return settings.llm_threads
    cpus = settings.llm_num_cpus
    # With no CPUs reserved, half the cores: fine-tunes on the same machine keep the rest, and
    # torch threads that outnumber free cores spin-wait for each other (measured on 2 shared
    # cores: 1 request at 1-4 tokens/s with 2 threads against 17 with 1).
    return max(1, int(cpus)) if cpus >= 1 else max(1, (os.cpu_count() or 2) // 2)


@serve.deployment(name=LLM_DEPLOYMENT, max_ongoing_requests=64, health_check_period_s=10,
                  graceful_shutdown_timeout_s=30)
class LLMServer:
    """Serves chat completions from the active model and any adapter of a loaded base."""

    def __init__(self, settings: dict[str, Any], engine_factory: EngineFactory | None = None, registry=None):
        from sage_ray.serve.model_registry import ServingRegistry

        self.settings = StudioSettings(**settings)
        self.registry = registry or ServingRegistry(self.settings)
        self.new_engine = engine_factory or studio_engines(self.settings)
        self.engines: OrderedDict[str, Engine] = OrderedDict()  # base folder -> engine, least recent first
        self.active: ModelSpec | None = None
        self.declared: str | None = None
        self.version = 0  # of the declaration in force (time.time_ns() when it was made)
        self.state = "starting"
        self.error: str | None = None
        self.swaps = 0
        self._switch_lock = asyncio.Lock()
        self._ready = asyncio.Event()  # cleared only while no model at all can answer
        self._engine_options: dict[str, Any] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self.loans = GpuLoans()
        self.canary: Canary | None = None  # declared with the model
        self.canary_spec: ModelSpec | None = None  # loaded: requests without a model go to it by weight
        self._random = random.Random()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Declare the model to serve. The first call (replica start) waits for it to load;
        later ones load in the background so chats keep flowing during the swap."""
        self._engine_options = {"gpu_memory_utilization": user_config.get(
            "gpu_memory_utilization", self.settings.gpu_memory_utilization)}
        ref = str(user_config.get("model") or self.settings.model)
        if self.active is None and self.declared is None and self.settings.gpu_policy == "release":
            await self.loans.inherit(self.registry, _node_id(), _app_name())
        switch = self._declare(ref, int(user_config.get("version") or 0), Canary.from_config(user_config.get("canary")))
        if switch is not None and self.active is None:
            await switch

    async def declare(self, ref: str, version: int, canary: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fast path of a switch with one replica: declared straight to it and awaited; the
        config deploy that follows (same ref and version) makes it durable and is a no-op here."""
        switch = self._declare(ref, version, Canary.from_config(canary))
        if switch is not None:
            # an adapter switch ends in milliseconds; a full model load is followed by polling
            await asyncio.wait([switch], timeout=DECLARE_WAIT_S)
        return self.status_dict()

    def _declare(self, ref: str, version: int, canary: Canary | None = None) -> asyncio.Task | None:
        # Declarations carry the time they were made: one that arrives after a newer one (a
        # config deploy trailing a direct declaration) is stale and ignored.
        unchanged = ref == self.declared and canary == self.canary and self.state in ("active", "loading")
        if version < self.version or unchanged:
            return None
        self.canary = canary
        # "loading" from the moment of the declaration: a reader must never see the new model
        # declared next to the old one's "active" and take the switch for done (or failed)
        self.version, self.declared, self.state = version, ref, "loading"
        return asyncio.create_task(self._switch(ref))

    async def _switch(self, ref: str) -> None:
        async with self._switch_lock:  # one swap at a time; a newer declaration wins
            if ref != self.declared:
                return
            self.state, started, previous = "loading", time.monotonic(), self.active
            try:
                spec = await asyncio.to_thread(self.registry.spec, ref)
                await self._engine_for(spec, swapping=True)
            except GpuLentError as err:  # reclaim_gpu switches to the declared model
                self.state, self.error = "lent", f"{err}; {ref!r} loads then"
                await asyncio.to_thread(self.registry.record_serving, self.status_dict())
                return
            except Exception as err:  # the old model keeps serving; the error is kept and reported
                self.error = f"could not load {ref!r}: {err}"
                log.error("LLMServer: %s", self.error)
                if self.active is None and previous is not None:  # it was unloaded to make room: take it back
                    await self._restore(previous)
                self.state = "active" if self.active else "failed"
                await asyncio.to_thread(self.registry.record_serving, self.status_dict())
                return
            self.active, self.error = spec, None
            await self._load_canary(ref)
            self.state = "active"
            self.swaps += 1
            self._ready.set()
            log.info("LLMServer: serving %s (%s) after %.2f s", spec.name, spec.kind, time.monotonic() - started)
            await asyncio.to_thread(self.registry.record_serving, self.status_dict())

    async def _load_canary(self, ref: str) -> None:
        """Load the declared canary next to the new model; one that cannot load is dropped, with the
        error on record (the model serves alone)."""
        self.canary_spec = None
        if self.canary is None:
            return
        try:
            spec = await asyncio.to_thread(self.registry.spec, self.canary.model)
            await self._engine_for(spec)
            self.canary_spec = spec
        except Exception as err:
            self.error = f"the canary {self.canary.model!r} could not load ({err}); {ref!r} serves alone"
            log.error("LLMServer: %s", self.error)

    async def _restore(self, spec: ModelSpec) -> None:
        try:
            await self._engine_for(spec)
            self.active = spec
            self._ready.set()
        except Exception:
            log.exception("LLMServer: could not reload the previous model %s either", spec.name)

    async def _engine_for(self, spec: ModelSpec, *, swapping: bool = False) -> Engine:
        """The engine whose base serves `spec`, loading the base and the adapter if needed."""
        base = spec.full_model_path
        engine = self.engines.get(base)
        if engine is not None and self.loans.silences(engine):
            raise self._lent_error()
        if engine is None:
            loading = self._loading.get(base)
            if loading is None:  # concurrent requests for one new base share one load
                loading = self._loading[base] = asyncio.ensure_future(self._load_base(spec, swapping))
                loading.add_done_callback(lambda _: self._loading.pop(base, None))
            engine = await asyncio.shield(loading)
        self.engines.move_to_end(base)
        if spec.kind == "lora":
            await engine.load_adapter(spec)
        return engine

    async def _load_base(self, spec: ModelSpec, swapping: bool) -> Engine:
        base = spec.full_model_path
        engine = self.new_engine(self._engine_options)
        if self.loans:
            if not engine.serves_asleep:
                raise self._lent_error()
            await engine.sleep()  # it loads off the GPU the fine-tune holds
        await self._make_room(swapping=swapping)
        await engine.start(ModelSpec(name=spec.name if spec.kind != "lora" else f"base:{base}", path=base,
                                     kind="merged" if spec.kind == "merged" else "base"))
        self.engines[base] = engine
        return engine

    def _lent_error(self) -> GpuLentError:
        return GpuLentError(f"the chat model lent its GPU to fine-tune {', '.join(sorted(self.loans.lent_to))} "
                            "(gpu_policy 'release'); it is back when that job ends")

    async def _make_room(self, *, swapping: bool) -> None:
        """Unload least-recently-used bases until one more fits. The active model goes only
        for a swap with room for one model: requests then wait for the new one instead of
        failing, since the two would not fit side by side."""
        active_base = self.active.full_model_path if self.active else None
        while len(self.engines) >= self.settings.max_loaded_models:
            victims = [base for base in self.engines if base != active_base]
            if not victims:
                if not swapping:
                    raise ModelUnavailableError(
                        "no room for another model next to the active one "
                        f"(max_loaded_models={self.settings.max_loaded_models}); switch to it instead")
                self._ready.clear()
                self.active, victims = None, [active_base]
            await self.engines.pop(victims[0]).shutdown()

    async def _target(self, model: str | None) -> tuple[Engine, ModelSpec]:
        if self.state == "lent":
            raise self._lent_error()
        if model is None or (self.active is not None and model in (self.active.name, self.active.path)):
            if self.active is None and self.state == "loading":
                await asyncio.wait_for(self._ready.wait(), timeout=600)  # a swap with room for one model
            active = self.active
            if active is None:
                raise ModelUnavailableError(f"no model is loaded: {self.error or 'the LLM service is starting'}")
            engine = self.engines[active.full_model_path]
            if self.loans.silences(engine):
                raise self._lent_error()
            if model is None and self.canary_spec is not None and self._random.random() < self.canary.weight:
                return await self._engine_for(self.canary_spec), self.canary_spec
            return engine, active
        spec = await asyncio.to_thread(self.registry.spec, model)
        return await self._engine_for(spec), spec

    def _check_prompt(self, request: dict[str, Any]) -> None:
        # here, not in the engine: tokenizing a megabyte in the generation thread stalls every chat
        chars = prompt_chars(request["messages"])
        if chars > self.settings.max_prompt_chars:
            raise PromptTooLongError(f"the prompt is {chars} characters, over this Studio's limit of "
                                     f"{self.settings.max_prompt_chars} (max_prompt_chars): shorten the conversation")

    async def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one reply: dicts with text, finish_reason and token counts, first one names the model."""
        self._check_prompt(request)
        engine, spec = await self._target(request.get("model"))
        stream = _reply(engine, spec, request)
        yield {"model": spec.name, "text": "", "finish_reason": None}
        async for delta in stream:
            yield asdict(delta)

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """One whole reply in one response: no per-token messages for a caller that does not stream."""
        from sage_ray.serve.engines.base import complete

        self._check_prompt(request)
        engine, spec = await self._target(request.get("model"))
        delta = await complete(_reply(engine, spec, request))
        return {"model": spec.name, **asdict(delta)}

    async def status(self) -> dict[str, Any]:
        return self.status_dict()

    def status_dict(self) -> dict[str, Any]:
        """What this replica serves: the declared and active model, the state and the last error."""
        active = self.active
        return {"declared": self.declared, "state": self.state, "error": self.error, "swaps": self.swaps,
                "active": None if active is None else {"name": active.name, "kind": active.kind,
                                                       "path": active.path, "base_path": active.base_path},
                "canary": None if self.canary_spec is None else {"name": self.canary_spec.name,
                                                                 "weight": self.canary.weight},
                "loaded_bases": list(self.engines), "version": self.version, "pid": os.getpid(),
                "engine": next((engine.name for engine in reversed(self.engines.values())), None),
                "stats": {base: engine.stats() for base, engine in self.engines.items()},
                "node_id": _node_id(), "gpu": self._gpu_hold()}

    # ---- lending the GPU to a fine-tune (gpu_policy "release", see gpu_lending) -------------
    def _gpu_hold(self) -> dict[str, Any] | None:
        """What this replica holds under a gpu_policy, for the job queue (sage_ray.placement)."""
        from sage_ray.placement import held_resources

        settings = self.settings
        if settings.gpu_policy == "none":
            return None
        return {"policy": settings.gpu_policy, "resources": held_resources(settings.llm_num_gpus,
                                                                            settings.llm_resources),
                "node_id": _node_id(), "actor_id": _runtime() and _runtime().get_actor_id(), "app": _app_name(),
                "lent_to": sorted(self.loans.lent_to)}

    async def release_gpu(self, task_id: str) -> dict[str, Any]:
        """Leave the GPU to fine-tune `task_id` until reclaim_gpu(task_id); idempotent."""
        if self.settings.gpu_policy != "release":
            raise ModelUnavailableError(f"gpu_policy is {self.settings.gpu_policy!r}: this replica does not lend "
                                        "its GPU; set gpu_policy 'release' in the Studio settings")
        async with self._switch_lock:
            await self.loans.lend(task_id, self.engines.values())
            if any(self.loans.silences(engine) for engine in self.engines.values()):
                self.state = "lent"
        await asyncio.to_thread(self.registry.record_serving, self.status_dict())
        return self.status_dict()

    async def reclaim_gpu(self, task_id: str) -> dict[str, Any]:
        """Take the GPU back from `task_id`; the engines wake once no job borrows it."""
        async with self._switch_lock:
            awake = await self.loans.take_back(task_id, self.engines.values())
            lent = awake and self.state == "lent"
            if lent and self.active is not None and self.declared in (self.active.name, self.active.path):
                self.state, self.error, lent = "active", None, False
        if lent and self.declared:  # a model declared during the loan loads now
            self.state = "loading"
            await self._switch(self.declared)
        await asyncio.to_thread(self.registry.record_serving, self.status_dict())
        return self.status_dict()

    async def check_health(self) -> None:
        # Healthy while it can take a switch: a replica whose model failed to load stays up
        # (restarting it would fail the same way) and says why in status().
        for task_id in await self.loans.ended(self.registry) if self.loans else []:
            await self.reclaim_gpu(task_id)
        engine = self.engines.get(self.active.full_model_path) if self.active is not None else None
        if engine is not None and not self.loans.silences(engine):
            await engine.check_health()


def _reply(engine: Engine, spec: ModelSpec, request: dict[str, Any]) -> AsyncIterator:
    """The engine's stream for a chat request, or for a raw `prompt` (/v1/completions)."""
    from sage_ray.serve.engines.base import check_supported

    values = {k: request[k] for k in SAMPLING_FIELDS if request.get(k) is not None}
    check_supported(engine, values, raw_prompt="prompt" in request)
    params, adapter = SamplingParams(**values), spec.name if spec.kind == "lora" else None
    if "prompt" in request:
        return engine.generate(request["prompt"], adapter=adapter, params=params)
    return engine.chat(request["messages"], adapter=adapter, params=params)


def _runtime():
    """Ray's runtime context; None outside Ray (asking for it there would start a cluster)."""
    import ray

    return ray.get_runtime_context() if ray.is_initialized() else None


def _node_id() -> str | None:
    return _runtime() and _runtime().get_node_id()


def _app_name() -> str | None:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # outside a replica (unit tests drive the class directly)
        return None
