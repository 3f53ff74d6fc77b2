"""The LLM deployment's swap and lending state machine, driven with a fake engine and a fake
registry (both named as such): no model, no Ray, only the decisions LLMServer makes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sage_ray.serve.engines.base import Delta, EngineError, ModelSpec
from sage_ray.serve.llm_server import LLMServer, ModelUnavailableError

Server = LLMServer.func_or_class  # the class under the Serve decorator


class FakeEngine:
    """Stands in for an engine: "loads" instantly (or after `load_s`), answers "<model>/<adapter>",
    fails to start on a folder named broken*."""

    name = "fake"

    def __init__(self, serves_asleep: bool = True, load_s: float = 0.0):
        self.serves_asleep = serves_asleep
        self.load_s = load_s
        self.model: ModelSpec | None = None
        self.loaded_adapters: set[str] = set()
        self.asleep = False
        self.events: list[str] = []

    async def start(self, model: ModelSpec) -> None:
        await asyncio.sleep(self.load_s)
        if "broken" in model.path:
            raise EngineError(f"{model.path} has no weights")
        self.model = model
        self.events.append(f"start {model.path}" + (" asleep" if self.asleep else ""))

    async def load_adapter(self, spec: ModelSpec) -> None:
        if "broken" in spec.path:
            raise EngineError(f"{spec.path} is not an adapter")
        self.loaded_adapters.add(spec.name)

    async def unload_adapter(self, name: str) -> None:
        self.loaded_adapters.discard(name)

    async def chat(self, messages, *, adapter=None, params=None):
        yield Delta(f"{self.model.path}/{adapter or 'base'}", "stop", 1, 1)

    async def check_health(self) -> None:
        if self.model is None:
            raise EngineError("not started")

    def stats(self) -> dict:
        return {"asleep": self.asleep}

    async def shutdown(self) -> None:
        self.events.append("shutdown")
        self.model = None

    async def sleep(self) -> None:
        self.asleep = True
        self.events.append("sleep")

    async def wake(self) -> None:
        self.asleep = False
        self.events.append("wake")

    @property
    def base_path(self):
        return self.model.path if self.model else None

    @property
    def adapters(self):
        return sorted(self.loaded_adapters)


class FakeRegistry:
    """Stands in for the registry actor: a fixed table of model references, records kept in memory."""

    def __init__(self):
        self.specs = {"base": ModelSpec("base", "/m/base", "base"),
                      "other": ModelSpec("other", "/m/other", "merged"),
                      "broken": ModelSpec("broken", "/m/broken", "merged"),
                      "lora": ModelSpec("lora", "/m/lora", "lora", base_path="/m/base"),
                      "bad-lora": ModelSpec("bad-lora", "/m/broken-lora", "lora", base_path="/m/base")}
        self.serving: dict[str, Any] | None = None
        self.jobs: dict[str, dict] = {}

    def spec(self, ref: str) -> ModelSpec:
        if ref not in self.specs:
            raise LookupError(f"no model named {ref!r}")
        return self.specs[ref]

    def record_serving(self, state):
        self.serving = state

    def get_serving(self):
        return self.serving

    def get_job(self, task_id):
        return self.jobs.get(task_id)


def make_server(*, serves_asleep: bool = True, policy: str = "none", load_s: float = 0.0):
    engines: list[FakeEngine] = []

    def factory(options):
        engines.append(FakeEngine(serves_asleep, load_s))
        return engines[-1]

    registry = FakeRegistry()
    server = Server({"model": "base", "engine": "hf", "gpu_policy": policy, "max_loaded_models": 1,
                     **({"llm_num_gpus": 0.5} if policy != "none" else {})},
                    engine_factory=factory, registry=registry)
    return server, engines, registry


async def reply(server, model=None) -> str:
    return (await server.complete({"messages": [{"role": "user", "content": "hi"}], "model": model}))["text"]


async def settle(server):
    while server.state == "loading":
        await asyncio.sleep(0.01)


def test_declare_serves_the_model_and_an_adapter_of_it_without_a_reload():
    async def run():
        server, engines, registry = make_server()
        await server.reconfigure({"model": "base", "version": 1})
        assert server.state == "active" and await reply(server) == "/m/base/base"
        await server.declare("lora", 2)
        assert server.status_dict()["active"]["name"] == "lora" and await reply(server) == "/m/base/lora"
        assert len(engines) == 1 and engines[0].events == ["start /m/base"]
        assert registry.serving["declared"] == "lora" and registry.serving["version"] == 2

    asyncio.run(run())


def test_reconfigure_switches_in_place_and_a_stale_declaration_is_ignored():
    async def run():
        server, engines, _ = make_server()
        await server.reconfigure({"model": "base", "version": 5})
        await server.reconfigure({"model": "other", "version": 7})
        await settle(server)
        assert server.active.name == "other" and server.swaps == 2
        await server.declare("base", 6)  # made before the one in force: a trailing config deploy
        assert server.active.name == "other" and server.declared == "other" and server.version == 7
        assert engines[0].events[-1] == "shutdown"  # max_loaded_models=1: the old base made room

    asyncio.run(run())


def test_a_failed_load_keeps_the_old_model_serving_with_the_error_on_record():
    async def run():
        server, _, registry = make_server()
        await server.reconfigure({"model": "lora", "version": 1})
        await server.declare("bad-lora", 2)
        await settle(server)
        assert server.state == "active" and server.active.name == "lora"
        assert "bad-lora" in server.error and await reply(server) == "/m/base/lora"
        await server.declare("broken", 3)  # a full model: the old base is unloaded for room, then restored
        await settle(server)
        assert server.active.name == "lora" and await reply(server) == "/m/base/lora"
        assert registry.serving["state"] == "active" and "broken" in registry.serving["error"]
        await server.declare("nonexistent", 4)
        await settle(server)
        assert "no model named 'nonexistent'" in server.error and server.active.name == "lora"

    asyncio.run(run())


def test_nothing_loaded_is_failed_and_the_next_declaration_recovers():
    async def run():
        server, _, _ = make_server()
        await server.reconfigure({"model": "broken", "version": 1})
        assert server.state == "failed" and server.active is None
        with pytest.raises(ModelUnavailableError, match="no model is loaded"):
            await reply(server)
        await server.declare("base", 2)
        await settle(server)
        assert server.state == "active" and await reply(server) == "/m/base/base"

    asyncio.run(run())


def test_a_restarted_replica_comes_back_with_the_declared_model():
    async def run():
        server, _, _ = make_server()
        await server.reconfigure({"model": "base", "version": 1})
        await server.declare("lora", 2)
        durable = {"model": server.declared, "version": server.version}  # what the config deploy keeps
        restarted, engines, _ = make_server()
        await restarted.reconfigure(durable)
        assert restarted.active.name == "lora" and await reply(restarted) == "/m/base/lora"
        assert engines[0].events == ["start /m/base"]

    asyncio.run(run())


def test_chats_during_a_full_swap_are_answered_by_the_old_or_the_new_model():
    async def run():
        server, _, _ = make_server(load_s=0.05)
        await server.reconfigure({"model": "base", "version": 1})
        server.settings.max_loaded_models = 2  # room for both: the old one answers while the new one loads
        await server.reconfigure({"model": "other", "version": 2})  # a config deploy: returns at once
        answers = []
        while server.state == "loading":
            answers.append(await reply(server))
            await asyncio.sleep(0.005)
        answers.append(await reply(server))
        assert set(answers) <= {"/m/base/base", "/m/other/base"} and answers[-1] == "/m/other/base"
        assert "/m/base/base" in answers

    asyncio.run(run())


def test_lending_an_engine_that_serves_asleep_keeps_answering_and_wakes_on_return():
    async def run():
        server, engines, registry = make_server(policy="release")
        await server.reconfigure({"model": "base", "version": 1})
        await server.release_gpu("job-1")
        await server.release_gpu("job-2")
        assert engines[0].asleep and server.state == "active" and await reply(server) == "/m/base/base"
        assert registry.serving["gpu"]["lent_to"] == ["job-1", "job-2"]
        await server.reclaim_gpu("job-1")
        assert engines[0].asleep  # job-2 still holds it
        await server.reclaim_gpu("job-2")
        assert not engines[0].asleep and engines[0].events == ["start /m/base", "sleep", "wake"]

    asyncio.run(run())


def test_lending_an_engine_that_cannot_serve_asleep_refuses_chats_and_loads_the_declared_model_after():
    async def run():
        server, engines, _ = make_server(policy="release", serves_asleep=False)
        await server.reconfigure({"model": "base", "version": 1})
        await server.release_gpu("job")
        assert server.state == "lent"
        with pytest.raises(ModelUnavailableError, match="lent its GPU to fine-tune job"):
            await reply(server)
        await server.declare("other", 2)  # declared during the loan: loads when it ends
        assert server.state == "lent" and server.declared == "other"
        assert [engine.events for engine in engines[1:]] == [[]]  # made, found unable to load now, never started
        await server.reclaim_gpu("job")
        await settle(server)
        assert server.state == "active" and await reply(server) == "/m/other/base"

    asyncio.run(run())


def test_a_replica_started_during_a_loan_inherits_it_and_a_dead_borrower_loses_it():
    async def run():
        server, engines, registry = make_server(policy="release")
        registry.serving = {"gpu": {"node_id": None, "app": None, "lent_to": ["job"]}}
        registry.jobs["job"] = {"status": "training"}
        await server.reconfigure({"model": "base", "version": 1})
        assert server.loans.lent_to == {"job"} and engines[0].events == ["sleep", "start /m/base asleep"]
        registry.jobs["job"]["status"] = "failed"  # its driver died without returning the GPU
        await server.check_health()
        assert not server.loans and not engines[0].asleep

    asyncio.run(run())


def test_release_is_refused_without_the_release_policy():
    async def run():
        server, _, _ = make_server(policy="wait")
        await server.reconfigure({"model": "base", "version": 1})
        with pytest.raises(ModelUnavailableError, match="gpu_policy is 'wait'"):
            await server.release_gpu("job")

    asyncio.run(run())


def test_a_huge_prompt_is_refused_before_the_engine_sees_it():
    from sage_ray.serve.llm_server import PromptTooLongError

    async def run():
        server, engines, _ = make_server()
        await server.reconfigure({"model": "base", "version": 1})
        huge = [{"role": "user", "content": [{"type": "text", "text": "x" * 150_000}]},
                {"role": "user", "content": "y" * 60_000}]
        with pytest.raises(PromptTooLongError, match="210000 characters"):
            await server.complete({"messages": huge})
        assert await reply(server) == "/m/base/base"

    asyncio.run(run())


def test_a_canary_answers_its_share_of_the_requests_that_name_no_model():
    import random

    from sage_ray.serve.canary import CanaryError, canary_of

    async def run():
        server, engines, registry = make_server()
        server.settings.max_loaded_models = 2
        server._random = random.Random(0)
        await server.reconfigure({"model": "base", "version": 1, "canary": {"model": "lora", "weight": 0.25}})
        assert server.status_dict()["canary"] == {"name": "lora", "weight": 0.25}
        answers = [await reply(server) for _ in range(400)]
        share = answers.count("/m/base/lora") / len(answers)
        assert 0.18 < share < 0.32 and set(answers) == {"/m/base/base", "/m/base/lora"}, share
        assert {await reply(server, "base") for _ in range(20)} == {"/m/base/base"}  # a named model is never rerouted
        # a full model as the canary loads next to the served one; a canary that cannot load is dropped
        await server.declare("base", 2, {"model": "other", "weight": 0.5})
        assert server.status_dict()["canary"]["name"] == "other" and "/m/other/base" in {await reply(server)
                                                                                          for _ in range(20)}
        await server.declare("base", 3, {"model": "broken", "weight": 0.5})
        status = server.status_dict()
        assert status["canary"] is None and "canary 'broken' could not load" in status["error"]
        assert {await reply(server) for _ in range(20)} == {"/m/base/base"}
        await server.declare("lora", 4)  # a switch without a canary serves the model alone
        assert server.status_dict()["canary"] is None and registry.serving["canary"] is None

    asyncio.run(run())
    assert canary_of(None, None) is None and canary_of("b", 0.1).weight == 0.1
    for model, weight, named in (("b", None, "weight"), (None, 0.1, "canary"), ("b", 1.0, "weight"), ("b", 0, "weight")):
        with pytest.raises(CanaryError, match=named):
            canary_of(model, weight)
