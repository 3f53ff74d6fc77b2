"""LLMServer: the Serve deployment that answers chats and hot-swaps models by `reconfigure`.

The declared model lives in the deployment's `user_config`; a config deploy that changes it
calls `reconfigure` on every replica in place (no restart). A LoRA adapter of the loaded base
switches without touching the base; another full model loads in the background while the
old one keeps answering, then the active pointer moves in one step. A model that fails to
load leaves the old one serving and its error on record. A restarted replica runs
`reconfigure` with the declared config and so comes back with the declared model.

Under a Studio gpu_policy of "release" a fine-tune borrows the replica's GPU: `release_gpu`
moves the transformers engine to CPU (it keeps answering, slower) or unloads other engines,
and `reclaim_gpu` moves or reloads the declared model back once no job borrows it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from dataclasses import asdict
from typing import Any, AsyncIterator

from ray import serve

from sage_ray.serve.engines.base import Engine, ModelSpec, SamplingParams, vllm_usable
from sage_ray.serve.settings import LLM_DEPLOYMENT, StudioSettings

log = logging.getLogger("ray.serve")
DECLARE_WAIT_S = 5.0
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "repetition_penalty", "stop", "seed", "presence_penalty",
                   "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "json_schema")


class ModelUnavailableError(RuntimeError):
    """No model can answer: none loaded yet, or the requested one failed to load."""


@serve.deployment(name=LLM_DEPLOYMENT, max_ongoing_requests=64, health_check_period_s=10,
                  graceful_shutdown_timeout_s=30)
class LLMServer:
    """Serves chat completions from the active model and any adapter of a loaded base."""

    def __init__(self, settings: dict[str, Any]):
        from sage_ray.serve.model_registry import ServingRegistry

        self.settings = StudioSettings(**settings)
        self.registry = ServingRegistry(self.settings)
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
        self.engine_kind = self.settings.engine if self.settings.engine != "auto" else (
            "vllm" if vllm_usable() else "hf")
        self.lent_to: set[str] = set()  # fine-tunes (task ids) the GPU is lent to
        self._unloaded_for_lending = False

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Declare the model to serve. The first call (replica start) waits for it to load;
        later ones load in the background so chats keep flowing during the swap."""
        self._engine_options = {"gpu_memory_utilization": user_config.get(
            "gpu_memory_utilization", self.settings.gpu_memory_utilization)}
        ref = str(user_config.get("model") or self.settings.model)
        if self.active is None and self.declared is None and self.settings.gpu_policy == "release":
            await self._inherit_loans()
        switch = self._declare(ref, int(user_config.get("version") or 0))
        if switch is not None and self.active is None:
            await switch

    async def declare(self, ref: str, version: int) -> dict[str, Any]:
        """The fast path of a switch with one replica: declared straight to it and awaited; the
        config deploy that follows (same ref and version) makes it durable and is a no-op here."""
        switch = self._declare(ref, version)
        if switch is not None:
            # an adapter switch ends in milliseconds; a full model load is followed by polling
            await asyncio.wait([switch], timeout=DECLARE_WAIT_S)
        return self.status_dict()

    def _declare(self, ref: str, version: int) -> asyncio.Task | None:
        # Declarations carry the time they were made: one that arrives after a newer one (a
        # config deploy trailing a direct declaration) is stale and ignored.
        if version < self.version or (ref == self.declared and self.state in ("active", "loading")):
            return None
        # "loading" from the moment of the declaration: a reader must never see the new model
        # declared next to the old one's "active" and take the switch for done (or failed)
        self.version, self.declared, self.state = version, ref, "loading"
        return asyncio.create_task(self._switch(ref))

    async def _switch(self, ref: str) -> None:
        async with self._switch_lock:  # one swap at a time; a newer declaration wins
            if ref != self.declared:
                return
            if self._unloaded_for_lending:  # the GPU is lent: reclaim_gpu loads the declared model
                self.state, self.error = "lent", (f"the GPU is lent to fine-tune {', '.join(sorted(self.lent_to))}; "
                                                  f"{ref!r} loads when that job ends")
                await asyncio.to_thread(self.registry.record_serving, self.status_dict())
                return
            self.state, started, previous = "loading", time.monotonic(), self.active
            try:
                spec = await asyncio.to_thread(self.registry.spec, ref)
                await self._engine_for(spec, swapping=True)
            except Exception as err:  # the old model keeps serving; the error is kept and reported
                self.error = f"could not load {ref!r}: {err}"
                log.error("LLMServer: %s", self.error)
                if self.active is None and previous is not None:  # it was unloaded to make room: take it back
                    await self._restore(previous)
                self.state = "active" if self.active else "failed"
                await asyncio.to_thread(self.registry.record_serving, self.status_dict())
                return
            self.active, self.error, self.state = spec, None, "active"
            self.swaps += 1
            self._ready.set()
            log.info("LLMServer: serving %s (%s) after %.2f s", spec.name, spec.kind, time.monotonic() - started)
            await asyncio.to_thread(self.registry.record_serving, self.status_dict())

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
        from sage_ray.serve.engines import create_engine

        base = spec.full_model_path
        await self._make_room(swapping=swapping)
        engine = create_engine(self.engine_kind, **(self._engine_options if self.engine_kind == "vllm" else
                                                    {"threads": self._hf_threads(),
                                                     **({"device": "cpu"} if self.lent_to else {})}))
        await engine.start(ModelSpec(name=spec.name if spec.kind != "lora" else f"base:{base}", path=base,
                                     kind="merged" if spec.kind == "merged" else "base"))
        self.engines[base] = engine
        return engine

    def _hf_threads(self) -> int:
        if self.settings.llm_threads:
            return self.settings.llm_threads
        cpus = self.settings.llm_num_cpus
        # With no CPUs reserved, half the cores: fine-tunes on the same machine keep the rest, and
        # torch threads that outnumber free cores spin-wait for each other (measured on 2 shared
        # cores: 1 request at 1-4 tokens/s with 2 threads against 17 with 1).
        return max(1, int(cpus)) if cpus >= 1 else max(1, (os.cpu_count() or 2) // 2)

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
        if self._unloaded_for_lending:
            raise ModelUnavailableError(f"the chat model lent its GPU to fine-tune {', '.join(sorted(self.lent_to))} "
                                        "(gpu_policy 'release'); it is back when that job ends")
        if model is None or (self.active is not None and model in (self.active.name, self.active.path)):
            if self.active is None and self.state == "loading":
                await asyncio.wait_for(self._ready.wait(), timeout=600)  # a swap with room for one model
            active = self.active
            if active is None:
                raise ModelUnavailableError(f"no model is loaded: {self.error or 'the LLM service is starting'}")
            return self.engines[active.full_model_path], active
        spec = await asyncio.to_thread(self.registry.spec, model)
        return await self._engine_for(spec), spec

    async def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one reply: dicts with text, finish_reason and token counts, first one names the model."""
        engine, spec = await self._target(request.get("model"))
        stream = _reply(engine, spec, request)
        yield {"model": spec.name, "text": "", "finish_reason": None}
        async for delta in stream:
            yield asdict(delta)

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """One whole reply in one response: no per-token messages for a caller that does not stream."""
        from sage_ray.serve.engines.base import complete

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
                "loaded_bases": list(self.engines), "engine": self.engine_kind, "pid": os.getpid(),
                "stats": {base: engine.stats() for base, engine in self.engines.items()},
                "node_id": _runtime().get_node_id(), "gpu": self._gpu_hold()}

    # ---- lending the GPU to a fine-tune (gpu_policy "release") ------------------------------
    def _gpu_hold(self) -> dict[str, Any] | None:
        """What this replica holds under a gpu_policy, for the job queue (sage_ray.placement)."""
        from sage_ray.placement import held_resources

        settings = self.settings
        if settings.gpu_policy == "none":
            return None
        return {"policy": settings.gpu_policy, "resources": held_resources(settings.llm_num_gpus,
                                                                            settings.llm_resources),
                "node_id": _runtime().get_node_id(), "actor_id": _runtime().get_actor_id(),
                "app": serve.get_replica_context().app_name, "lent_to": sorted(self.lent_to)}

    async def release_gpu(self, task_id: str) -> dict[str, Any]:
        """Leave the GPU to fine-tune `task_id` until reclaim_gpu(task_id); idempotent."""
        if self.settings.gpu_policy != "release":
            raise ModelUnavailableError(f"gpu_policy is {self.settings.gpu_policy!r}: this replica does not lend "
                                        "its GPU; set gpu_policy 'release' in the Studio settings")
        async with self._switch_lock:
            first = not self.lent_to
            self.lent_to.add(task_id)
            if first:
                if self.engine_kind == "hf":
                    await asyncio.to_thread(self._move_engines, "cpu")
                else:  # vLLM cannot leave the GPU and keep serving: unload, reload after
                    self._unloaded_for_lending, self.active = True, None
                    self._ready.clear()
                    while self.engines:
                        await self.engines.popitem()[1].shutdown()
                    self.state = "lent"
        log.info("LLMServer: GPU lent to %s", sorted(self.lent_to))
        await asyncio.to_thread(self.registry.record_serving, self.status_dict())
        return self.status_dict()

    async def reclaim_gpu(self, task_id: str) -> dict[str, Any]:
        """Take the GPU back from `task_id`; the model returns to it once no job borrows it."""
        async with self._switch_lock:
            self.lent_to.discard(task_id)
            reload = not self.lent_to and self._unloaded_for_lending
            if not self.lent_to and self.engine_kind == "hf":
                await asyncio.to_thread(self._move_engines, None)
            self._unloaded_for_lending = False if reload else self._unloaded_for_lending
        if reload and self.declared:
            await self._switch(self.declared)
        log.info("LLMServer: GPU back from %s (still lent to %s)", task_id, sorted(self.lent_to) or "none")
        await asyncio.to_thread(self.registry.record_serving, self.status_dict())
        return self.status_dict()

    def _move_engines(self, device: str | None) -> None:
        """Move every transformers engine's model to `device` (None: the engine's default, the GPU
        when there is one); requests keep flowing on the device it is on."""
        import torch

        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for engine in self.engines.values():
            model = getattr(engine, "base_model", None)
            if model is None or engine.device == target:
                continue

            def move(engine=engine, model=model) -> None:
                model.to(target)
                engine.device = target  # inputs of the next batch follow the model

            engine._locked(move)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    async def _inherit_loans(self) -> None:
        """A replica started while its node's GPU is lent (the previous one died mid-job) keeps
        the loan: loading the model onto the GPU under a running fine-tune would run both out of
        memory. The transformers engine then loads on CPU; vLLM waits for the job to end."""
        from sage_ray.registry.store import TERMINAL

        try:
            serving = await asyncio.to_thread(self.registry.get_serving) or {}
        except Exception:  # no registry yet: nothing can have been lent
            return
        gpu = serving.get("gpu") or {}
        if gpu.get("node_id") != _runtime().get_node_id() or gpu.get("app") != serve.get_replica_context().app_name:
            return
        for task_id in gpu.get("lent_to") or []:
            job = await asyncio.to_thread(self.registry.get_job, task_id)
            if job is not None and job["status"] not in TERMINAL:
                self.lent_to.add(task_id)
        if self.lent_to:
            log.info("LLMServer: starting with the GPU still lent to %s", sorted(self.lent_to))
            self._unloaded_for_lending = self.engine_kind != "hf"

    async def _reclaim_from_finished_jobs(self) -> None:
        """A borrower whose job ended without handing the GPU back (its driver died) loses it."""
        from sage_ray.registry.store import TERMINAL

        for task_id in sorted(self.lent_to):
            job = await asyncio.to_thread(self.registry.get_job, task_id)
            if job is None or job["status"] in TERMINAL:
                log.warning("LLMServer: fine-tune %s ended without returning the GPU; taking it back", task_id)
                await self.reclaim_gpu(task_id)

    async def check_health(self) -> None:
        # Healthy while it can take a switch: a replica whose model failed to load stays up
        # (restarting it would fail the same way) and says why in status().
        if self.lent_to:
            await self._reclaim_from_finished_jobs()
        if self.active is not None and not self._unloaded_for_lending:
            await self.engines[self.active.full_model_path].check_health()


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
    import ray

    return ray.get_runtime_context()
