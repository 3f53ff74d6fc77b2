"""The engine protocol, one suite for both engines: every test runs on `hf` and on `vllm`
(ids say which), on the demo model with two LoRA adapters trained here.

One engine per parameter serves the whole module (vLLM starts in 30 s or more), loaded with
the base and both adapters. Replies are greedy and compared with plain transformers + peft.
vLLM's AsyncLLM is bound to the event loop that first uses it, so every call runs on one
module-wide loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from pathlib import Path

import psutil
import pytest

from sage_ray.serve.engines import BASE_ADAPTER, EngineError, ModelSpec, SamplingParams, complete, create_engine
from tests.engine_support import one_torch_thread, require_vllm
from tests.lora import train_adapter

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
STEPS = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Explain step by step how to boil an egg."}]
N = 12  # tokens per greedy reply in the comparisons
# hf: a 50 ms batching window, so a test's concurrent requests land in one batch; vllm: 1 GiB of
# KV cache (plenty for these prompts) and room for the two adapters.
OPTIONS = {"hf": {"device": "cpu", "batch_wait_ms": 50, "threads": 1}, "vllm": {"cpu_kv_cache_gb": 1, "max_loras": 2}}


def greedy(max_tokens: int = N, **extra) -> SamplingParams:
    # ignore_eos: a fixed length compares more tokens than a reply that may end early
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def adapters(demo_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters of the demo model, each trained a few steps on its own sentence."""
    folder = tmp_path_factory.mktemp("adapters")
    return {"a1": train_adapter(demo_model_dir, folder / "a1", "The answer is always forty two.", 1),
            "a2": train_adapter(demo_model_dir, folder / "a2", "Bonjour bonjour le monde, bonjour.", 2)}


def adapter_spec(name: str, adapters, demo_model_dir) -> ModelSpec:
    return ModelSpec(name, str(adapters[name]), "lora", base_path=str(demo_model_dir))


@pytest.fixture(scope="module", params=["hf", "vllm"], ids=lambda kind: f"engine={kind}")
def engine(request, loop, demo_model_dir, adapters):
    """The engine under test, serving the demo base plus adapters a1 and a2."""
    if request.param == "vllm":
        require_vllm()
    engine = create_engine(request.param, **OPTIONS[request.param])
    engine.children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        loop.run_until_complete(engine.start(ModelSpec("demo", str(demo_model_dir), "base")))
        for name in ("a1", "a2"):
            loop.run_until_complete(engine.load_adapter(adapter_spec(name, adapters, demo_model_dir)))
        yield engine
    finally:
        loop.run_until_complete(engine.shutdown())


@pytest.fixture
def ask(engine, loop):
    """ask(messages, adapter=None, params=None) -> the whole reply as one Delta."""
    def ask(messages, adapter=None, params=None):
        return loop.run_until_complete(complete(engine.chat(messages, adapter=adapter, params=params or greedy())))
    return ask


@functools.lru_cache(maxsize=None)
def reference(model_dir: str, messages: str, adapter_dir: str | None = None, max_tokens: int = N) -> str:
    """Greedy text from plain transformers / peft: one request alone, no padding, no engine."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_ray.inference import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    prompt = torch.tensor([encode_chat(tokenizer, json.loads(messages))])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, eos_token_id=[],
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


def expected(demo_model_dir, messages, adapter_dir=None) -> str:
    return reference(str(demo_model_dir), json.dumps(messages), str(adapter_dir) if adapter_dir else None)


def test_start_serves_the_model_and_it_ends_its_turn(engine, ask, loop, demo_model_dir):
    assert engine.base_path == os.path.realpath(demo_model_dir) and engine.adapters == ["a1", "a2"]
    stats = engine.stats()
    assert stats["engine"] == engine.name and stats["device"] == "cpu"
    reply = ask(CAPITAL, params=SamplingParams(max_tokens=40, temperature=0))
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop" and reply.completion_tokens < 40 and reply.prompt_tokens > 10
    loop.run_until_complete(engine.check_health())


def test_streamed_pieces_join_to_the_whole_reply(engine, ask, loop):
    async def pieces():
        return [d async for d in engine.chat(STEPS, adapter="a1", params=greedy(24))]

    deltas = loop.run_until_complete(pieces())
    assert len(deltas) > 2 and all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 24
    assert deltas[-1].prompt_tokens > 0
    assert "".join(d.text for d in deltas) == ask(STEPS, "a1", greedy(24)).text


def test_each_request_gets_its_adapter_as_peft_computes_it(engine, ask, demo_model_dir, adapters):
    replies = {name: ask(CAPITAL, name).text for name in (BASE_ADAPTER, "a1", "a2")}
    assert replies[BASE_ADAPTER] == expected(demo_model_dir, CAPITAL)
    assert replies["a1"] == expected(demo_model_dir, CAPITAL, adapters["a1"])
    assert replies["a2"] == expected(demo_model_dir, CAPITAL, adapters["a2"])
    assert len(set(replies.values())) == 3, f"base and adapters must answer differently: {replies}"
    assert ask(CAPITAL).text == replies[BASE_ADAPTER]  # no adapter named: the started model, the base


def test_mixed_batch_equals_each_request_alone(engine, ask, loop):
    requests = [(CAPITAL, None), (CAPITAL, "a1"), (STEPS, "a2"), (CAPITAL, "a2"), (STEPS, BASE_ADAPTER),
                (STEPS, "a1")]
    alone = [ask(messages, adapter).text for messages, adapter in requests]

    async def together():
        return await asyncio.gather(*[complete(engine.chat(m, adapter=a, params=greedy())) for m, a in requests])

    batched = loop.run_until_complete(together())
    assert [r.text for r in batched] == alone
    assert all(r.completion_tokens == N and r.finish_reason == "length" for r in batched)
    if engine.name == "hf":  # vLLM schedules continuously and reports no batch sizes
        assert max(engine.stats()["batch_sizes"]) > 1, "the requests were not batched"


def test_adapters_are_added_and_removed_without_touching_the_base(engine, ask, loop, demo_model_dir, adapters):
    before = ask(CAPITAL, "a1").text
    loop.run_until_complete(engine.unload_adapter("a1"))
    assert engine.adapters == ["a2"]
    with pytest.raises(EngineError, match="not loaded"):
        ask(CAPITAL, "a1")
    for _ in range(2):  # the second load is a no-op
        loop.run_until_complete(engine.load_adapter(adapter_spec("a1", adapters, demo_model_dir)))
    assert engine.adapters == ["a1", "a2"]
    assert ask(CAPITAL, "a1").text == before
    assert engine.base_path == os.path.realpath(demo_model_dir)


def test_start_with_an_adapter_of_the_loaded_base_only_changes_the_default(engine, ask, loop, demo_model_dir,
                                                                          adapters):
    loads = engine.stats()["base_loads"]
    loop.run_until_complete(engine.start(adapter_spec("a2", adapters, demo_model_dir)))
    assert engine.stats()["default_adapter"] == "a2" and ask(CAPITAL).text == ask(CAPITAL, "a2").text
    loop.run_until_complete(engine.start(ModelSpec("demo", str(demo_model_dir), "base")))
    assert engine.stats()["default_adapter"] == BASE_ADAPTER and ask(CAPITAL).text == ask(CAPITAL, BASE_ADAPTER).text
    assert engine.stats()["base_loads"] == loads and engine.adapters == ["a1", "a2"]


def test_a_broken_adapter_raises_and_the_engine_keeps_serving(engine, ask, loop, demo_model_dir, adapters,
                                                              tmp_path):
    served = ask(CAPITAL, "a1").text
    good = adapters["a1"]
    folders = {name: tmp_path / name for name in ("no_weights", "corrupt", "wrong_rank")}
    for folder in folders.values():
        folder.mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    (folders["no_weights"] / "adapter_config.json").write_text(json.dumps(config))
    (folders["corrupt"] / "adapter_config.json").write_text(json.dumps(config))
    (folders["corrupt"] / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (folders["wrong_rank"] / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))  # weights are r=4
    (folders["wrong_rank"] / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    for folder in (tmp_path / "missing", *folders.values()):
        with pytest.raises(EngineError, match="adapter"):
            loop.run_until_complete(engine.load_adapter(ModelSpec("bad", str(folder), "lora",
                                                                  base_path=str(demo_model_dir))))
    with pytest.raises(EngineError, match="config.json"):
        loop.run_until_complete(engine.start(ModelSpec("bad", str(tmp_path), "base")))
    with pytest.raises(EngineError, match="not loaded"):
        ask(CAPITAL, "bad")
    assert engine.adapters == ["a1", "a2"] and engine.base_path == os.path.realpath(demo_model_dir)
    assert ask(CAPITAL, "a1").text == served
    loop.run_until_complete(engine.check_health())


def test_a_stop_string_ends_the_reply_before_it(engine, ask):
    full = ask(STEPS, "a2", greedy(24)).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: no usable stop string in {full!r}"
    reply = ask(STEPS, "a2", greedy(24, stop=[stop]))
    assert reply.finish_reason == "stop"
    assert reply.text == full[:full.index(stop)]
    assert reply.completion_tokens < 24


def test_max_tokens_per_request_in_one_batch(engine, loop):
    limits = [1, 3, 7, 16]

    async def together():
        return await asyncio.gather(*[complete(engine.chat(CAPITAL, adapter=a, params=greedy(n)))
                                      for n, a in zip(limits, [None, "a1", "a2", "a1"])])

    replies = loop.run_until_complete(together())
    assert [r.completion_tokens for r in replies] == limits
    assert all(r.finish_reason == "length" for r in replies)


def test_ignore_eos_runs_past_the_end_of_the_turn(engine, ask):
    natural = ask(CAPITAL, params=SamplingParams(max_tokens=40, temperature=0))
    assert natural.finish_reason == "stop" and natural.completion_tokens < 40
    longer = natural.completion_tokens + 8
    forced = ask(CAPITAL, params=SamplingParams(max_tokens=longer, temperature=0, ignore_eos=True))
    assert forced.finish_reason == "length" and forced.completion_tokens == longer
    assert forced.text.startswith(natural.text) and len(forced.text) > len(natural.text)
    cut = ask(CAPITAL, params=SamplingParams(max_tokens=3, temperature=0))
    assert cut.finish_reason == "length" and cut.completion_tokens == 3


def test_seeded_sampling_is_reproducible(engine, ask):
    sampled = SamplingParams(max_tokens=N, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    assert ask(STEPS, params=sampled).text == ask(STEPS, params=sampled).text


def test_sleep_and_wake_keep_the_model_and_its_adapters(engine, ask, loop):
    before = ask(CAPITAL, "a2").text
    loop.run_until_complete(engine.sleep())
    loop.run_until_complete(engine.sleep())  # idempotent
    loop.run_until_complete(engine.check_health())  # asleep on purpose is healthy
    if engine.serves_asleep:
        assert ask(CAPITAL, "a2").text == before
    else:
        with pytest.raises(EngineError, match="asleep"):
            ask(CAPITAL, "a2")
    loop.run_until_complete(engine.wake())
    loop.run_until_complete(engine.wake())
    assert engine.adapters == ["a1", "a2"]
    assert ask(CAPITAL, "a2").text == before


@functools.lru_cache(maxsize=None)
def first_step_logprobs(model_dir: str, messages: str) -> list[float]:
    """transformers' log-probabilities of the reply's first token, over the vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_ray.inference import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encode_chat(tokenizer, json.loads(messages))])).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1).tolist()


def test_logprobs_are_the_models_and_top_logprobs_are_ranked(engine, ask, demo_model_dir):
    reply = ask(CAPITAL, params=greedy(6, logprobs=True, top_logprobs=3))
    assert len(reply.logprobs) == 6 and "".join(e["token"] for e in reply.logprobs) == reply.text
    for entry in reply.logprobs:
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == pytest.approx(entry["logprob"])  # greedy
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    reference = first_step_logprobs(str(demo_model_dir), json.dumps(CAPITAL))
    best = sorted(range(len(reference)), key=reference.__getitem__, reverse=True)[:3]
    assert [t["logprob"] for t in reply.logprobs[0]["top_logprobs"]] == pytest.approx(
        [reference[t] for t in best], abs=2e-3)
    assert ask(CAPITAL, params=greedy(6)).logprobs is None  # not asked: not computed


def test_logit_bias_bans_and_forces_tokens(engine, ask, loop):
    tokenizer = _tokenizer(engine)
    plain = ask(CAPITAL, params=greedy(6, logprobs=True))
    first = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(plain.logprobs[0]["token"]))[0]
    banned = ask(CAPITAL, params=greedy(6, logprobs=True, logit_bias={first: -100}))
    assert banned.logprobs[0]["token"] != plain.logprobs[0]["token"]
    forced_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" banana"))[0]
    forced = ask(CAPITAL, params=greedy(4, logit_bias={forced_id: 100}))
    assert forced.text == tokenizer.decode([forced_id] * 4)


def test_frequency_and_presence_penalties_curb_repetition(engine, ask):
    def repeats(text: str) -> int:
        ids = _tokenizer(engine)(text, add_special_tokens=False)["input_ids"]
        return len(ids) - len(set(ids))

    plain = ask(STEPS, params=greedy(48))
    penalised = ask(STEPS, params=greedy(48, frequency_penalty=2.0, presence_penalty=1.0))
    assert repeats(penalised.text) < repeats(plain.text), (plain.text, penalised.text)


def test_json_schema_is_enforced_and_a_bad_schema_is_refused(engine, ask):
    from sage_ray.serve.engines.grammar import GrammarError

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    reply = ask(CAPITAL, params=SamplingParams(max_tokens=40, temperature=0, json_schema=schema))
    assert reply.finish_reason == "stop" and isinstance(json.loads(reply.text)["city"], str), reply.text
    with pytest.raises(GrammarError, match="strin"):  # a 400 naming the fault
        ask(CAPITAL, params=SamplingParams(max_tokens=8, json_schema={"type": "object",
                                                                      "properties": {"a": {"type": "strin"}}}))


def test_a_raw_prompt_continues_the_text_as_transformers_does(engine, loop, demo_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = "The three primary colours are"
    reply = loop.run_until_complete(complete(engine.generate(prompt, params=greedy(8))))
    tokenizer = _tokenizer(engine)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval().generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, min_new_tokens=8,
            eos_token_id=[], pad_token_id=tokenizer.pad_token_id)
    assert reply.text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert reply.prompt_tokens == ids.shape[1] and reply.completion_tokens == 8


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TOOLS_TEMPLATE = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
                  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tools_go_through_the_served_template_or_are_refused(engine, ask, loop, demo_model_dir, adapters, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from sage_ray.inference import encode_chat
    from sage_ray.serve.engines.base import UnsupportedParamError

    with pytest.raises(UnsupportedParamError, match="tools"):  # the demo model's template has no tools
        ask(CAPITAL, params=greedy(4, tools=TOOLS))
    # an adapter folder carries its own template (what training used): one that renders tools
    folder = shutil.copytree(adapters["a1"], tmp_path / "tooly")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(folder)
    loop.run_until_complete(engine.load_adapter(ModelSpec("tooly", str(folder), "lora",
                                                          base_path=str(demo_model_dir))))
    try:
        with_tools = ask(CAPITAL, "tooly", greedy(4, tools=TOOLS))
        without = ask(CAPITAL, "tooly", greedy(4))
        assert with_tools.prompt_tokens == len(encode_chat(tokenizer, CAPITAL, TOOLS)) > without.prompt_tokens
    finally:  # vLLM keeps max_loras adapters: a1 or a2 made room for this one
        loop.run_until_complete(engine.unload_adapter("tooly"))
        for name in ("a1", "a2"):
            loop.run_until_complete(engine.load_adapter(adapter_spec(name, adapters, demo_model_dir)))
    assert engine.adapters == ["a1", "a2"]


def _tokenizer(engine):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(engine.base_path)


def test_shutdown_stops_serving_and_leaves_no_process(engine, ask, loop):
    loop.run_until_complete(engine.shutdown())
    with pytest.raises(EngineError, match="start"):
        ask(CAPITAL)
    with pytest.raises(EngineError, match="start"):
        loop.run_until_complete(engine.check_health())
    deadline = time.monotonic() + 30  # vLLM's engine core ends its worker after a grace period
    while left := [p for p in psutil.Process().children(recursive=True) if p.pid not in engine.children_before
                   and _alive(p) and "resource_tracker" not in " ".join(_cmdline(p))]:
        assert time.monotonic() < deadline, f"processes left after shutdown: {[_cmdline(p) for p in left]}"
        time.sleep(1)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # exited meanwhile
        return False


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # exited meanwhile
        return []
