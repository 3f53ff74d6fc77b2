"""The serving engines without Ray: the hf engine on the tiny model with two random LoRA adapters,
the text helpers, engine selection and the vLLM request conversions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from sage_ray.serve.engines import (
    BASE_ADAPTER,
    EngineError,
    ModelSpec,
    SamplingParams,
    complete,
    create_engine,
    vllm_usable,
)
from sage_ray.serve.engines.text import IncrementalDecoder, StopMatcher
from sage_ray.utils import is_available

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONGER = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Please explain your reasoning step by step, then give the final answer."}]
N = 12  # tokens per greedy reply in the comparisons


def greedy(max_tokens: int = N, **extra) -> SamplingParams:
    # ignore_eos: a random model may end its turn at once; a fixed length compares more tokens.
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)


def run(coro):
    return asyncio.run(coro)


def ask(engine, messages, adapter=None, params=None):
    return run(complete(engine.chat(messages, adapter=adapter, params=params or greedy())))


@pytest.fixture(scope="module")
def lora_dirs(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters of the tiny model with random (non-zero) lora_B, so each changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = {}
    for seed, name in enumerate(("a1", "a2")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                            init_lora_weights=False)
        folders[name] = tmp_path_factory.mktemp(name)
        get_peft_model(model, config).save_pretrained(folders[name])
        # A fine-tune saves its tokenizer beside the adapter (merge_adapter reads it from there).
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folders[name])
    return folders


def lora_spec(name: str, lora_dirs, tiny_model_dir) -> ModelSpec:
    return ModelSpec(name, str(lora_dirs[name]), "lora", base_path=str(tiny_model_dir))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, lora_dirs):
    """One hf engine serving the tiny base plus both adapters (50 ms batching window: concurrent
    requests of a test reliably land in one batch)."""
    engine = create_engine("hf", device="cpu", batch_wait_ms=50)
    run(engine.start(ModelSpec("tiny", str(tiny_model_dir), "base")))
    for name in ("a1", "a2"):
        run(engine.load_adapter(lora_spec(name, lora_dirs, tiny_model_dir)))
    yield engine
    run(engine.shutdown())


def reference(model_dir: Path, messages, adapter_dir: Path | None = None, max_tokens: int = N) -> str:
    """Greedy text from plain transformers / peft, one request alone, no padding, no engine."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_ray.inference import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    prompt = torch.tensor([encode_chat(tokenizer, messages)])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, eos_token_id=[],
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


def test_mixed_adapter_batch_equals_single_adapter_peft(engine, tiny_model_dir, lora_dirs):
    requests = [(QUESTION, None), (QUESTION, "a1"), (LONGER, "a2"), (QUESTION, "a2"), (LONGER, BASE_ADAPTER)]
    before = sum(n for size, n in engine.stats()["batch_sizes"].items() if size > 1)

    async def together():
        return await asyncio.gather(*[complete(engine.chat(m, adapter=a, params=greedy())) for m, a in requests])

    replies = run(together())
    assert sum(n for size, n in engine.stats()["batch_sizes"].items() if size > 1) > before, "not batched"
    texts = [r.text for r in replies]
    assert texts[0] == reference(tiny_model_dir, QUESTION)
    assert texts[1] == reference(tiny_model_dir, QUESTION, lora_dirs["a1"])
    assert texts[2] == reference(tiny_model_dir, LONGER, lora_dirs["a2"])
    assert texts[3] == reference(tiny_model_dir, QUESTION, lora_dirs["a2"])
    assert texts[4] == reference(tiny_model_dir, LONGER)
    assert len({texts[0], texts[1], texts[3]}) == 3, "base, a1 and a2 must answer differently"
    assert all(r.completion_tokens == N and r.finish_reason == "length" for r in replies)


def test_streamed_pieces_join_to_the_non_streamed_text(engine, tiny_model_dir):
    async def pieces():
        return [d async for d in engine.chat(LONGER, adapter="a1", params=greedy(24))]

    deltas = run(pieces())
    assert len(deltas) > 2 and all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 24
    assert deltas[-1].prompt_tokens > 0
    assert "".join(d.text for d in deltas) == ask(engine, LONGER, "a1", greedy(24)).text


def test_incremental_decoder_never_splits_a_character(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Café 東京 and 日本語の文章 🚀🎉 한국어 ąę — “quotes”…"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The precondition: decoding token by token breaks characters split over byte-level tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_matcher_holds_back_a_partial_stop_string():
    matcher = StopMatcher(["STOP!"])
    assert matcher.feed("hello ST") == ("hell", False)  # the last 4 characters could start "STOP!"
    assert matcher.feed("OP! and more") == ("o ", True)
    free = StopMatcher(None)
    assert free.feed("anything") == ("anything", False)
    tail = StopMatcher(["XYZ"])
    assert tail.feed("abcXY") == ("abc", False) and tail.flush() == "XY"


def test_per_request_max_tokens_in_one_batch(engine):
    limits = [1, 3, 7, 16]

    async def together():
        return await asyncio.gather(*[complete(engine.chat(QUESTION, adapter=a, params=greedy(n)))
                                      for n, a in zip(limits, [None, "a1", "a2", "a1"])])

    replies = run(together())
    assert [r.completion_tokens for r in replies] == limits
    assert all(r.finish_reason == "length" for r in replies)
    assert max(engine.stats()["batch_sizes"]) > 1


def test_stop_string_ends_the_reply(engine):
    full = ask(engine, LONGER, "a2", greedy(24)).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: no usable stop string in {full!r}"
    reply = ask(engine, LONGER, "a2", greedy(24, stop=[stop]))
    assert reply.finish_reason == "stop"
    assert reply.text == full[:full.index(stop)]
    assert reply.completion_tokens < 24


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(engine):
    sampled = SamplingParams(max_tokens=N, temperature=1.5, top_p=0.95, seed=7, ignore_eos=True)

    async def twice():
        return await asyncio.gather(complete(engine.chat(QUESTION, params=sampled)),
                                    complete(engine.chat(QUESTION, params=sampled)))

    first, second = run(twice())
    assert first.text == second.text
    assert first.text != ask(engine, QUESTION).text


def test_load_adapter_keeps_the_base_and_is_idempotent(engine, tiny_model_dir, lora_dirs):
    base = engine.base_model
    weight = base.get_input_embeddings().weight.data_ptr()
    run(engine.unload_adapter("a1"))
    assert engine.adapters == ["a2"]
    run(engine.load_adapter(lora_spec("a1", lora_dirs, tiny_model_dir)))
    run(engine.load_adapter(lora_spec("a1", lora_dirs, tiny_model_dir)))  # already loaded: no-op
    assert engine.base_model is base and base.get_input_embeddings().weight.data_ptr() == weight
    assert engine.adapters == ["a1", "a2"]
    assert ask(engine, QUESTION, "a1").text == reference(tiny_model_dir, QUESTION, lora_dirs["a1"])


def test_broken_folders_raise_and_the_engine_keeps_serving(engine, tiny_model_dir, lora_dirs, tmp_path):
    expected = ask(engine, QUESTION, "a1").text
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((lora_dirs["a1"] / "adapter_config.json").read_text())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((lora_dirs["a1"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    wrong_shape = tmp_path / "wrong_shape"
    wrong_shape.mkdir()
    config = json.loads((lora_dirs["a1"] / "adapter_config.json").read_text())
    (wrong_shape / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))  # weights are r=4
    (wrong_shape / "adapter_model.safetensors").write_bytes((lora_dirs["a1"] / "adapter_model.safetensors").read_bytes())
    for folder in (tmp_path / "missing", no_weights, corrupt, wrong_shape):
        with pytest.raises(EngineError, match="adapter"):
            run(engine.load_adapter(ModelSpec("bad", str(folder), "lora", base_path=str(tiny_model_dir))))
    with pytest.raises(EngineError, match="config.json"):
        run(engine.start(ModelSpec("bad", str(tmp_path), "base")))
    with pytest.raises(EngineError, match="not loaded"):
        ask(engine, QUESTION, "bad")
    assert engine.adapters == ["a1", "a2"] and engine.base_path == str(tiny_model_dir.resolve())
    assert ask(engine, QUESTION, "a1").text == expected
    run(engine.check_health())


def test_start_serves_a_lora_spec_then_a_merged_model(tiny_model_dir, lora_dirs, tmp_path):
    from sage_ray.train.merge import merge_adapter

    merged = merge_adapter(lora_dirs["a1"], tiny_model_dir, tmp_path / "merged")
    expected = reference(tiny_model_dir, QUESTION, lora_dirs["a1"])
    engine = create_engine("hf", device="cpu")
    try:
        run(engine.start(lora_spec("a1", lora_dirs, tiny_model_dir)))
        assert engine.adapters == ["a1"] and engine.stats()["default_adapter"] == "a1"
        assert ask(engine, QUESTION).text == expected  # no adapter named: the started model's
        base = engine.base_model
        # The same base folder again: switched without a reload.
        run(engine.start(ModelSpec("tiny", str(tiny_model_dir), "base")))
        assert engine.base_model is base and engine.stats()["default_adapter"] == BASE_ADAPTER
        run(engine.start(lora_spec("a2", lora_dirs, tiny_model_dir)))
        assert engine.base_model is base and engine.adapters == ["a1", "a2"]
        assert engine.stats()["default_adapter"] == "a2"
        run(engine.start(ModelSpec("merged", str(merged), "merged")))
        assert engine.adapters == [] and engine.base_path == str(merged.resolve())
        assert engine.base_model is not base
        assert ask(engine, QUESTION).text == expected
        assert engine.stats()["requests_served"] == 2
    finally:
        run(engine.shutdown())
    with pytest.raises(EngineError, match="start"):
        run(engine.check_health())


def test_create_engine_picks_hf_without_a_gpu_and_vllm_needs_its_extra():
    assert create_engine("auto").name == ("vllm" if vllm_usable() else "hf")
    with pytest.raises(EngineError, match="unknown engine"):
        create_engine("tgi")
    if not is_available("vllm"):
        with pytest.raises(EngineError, match="make install-vllm"):
            create_engine("vllm")


def test_vllm_request_conversion():
    from sage_ray.serve.engines import vllm_args

    params = SamplingParams(max_tokens=9, temperature=0, top_p=0.5, repetition_penalty=1.2, stop="###", seed=3)
    assert vllm_args.sampling_kwargs(params, [2, 7]) == {
        "n": 1, "max_tokens": 9, "temperature": 0, "top_p": 0.5, "repetition_penalty": 1.2, "stop": ["###"],
        "stop_token_ids": [2, 7], "seed": 3, "ignore_eos": False, "skip_special_tokens": True,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "logprobs": None,
        "structured_outputs": None,
    }
    asked = SamplingParams(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"5": -100}, logprobs=True,
                           top_logprobs=3)
    assert {k: v for k, v in vllm_args.sampling_kwargs(asked, []).items()
            if k in ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs")} == {
        "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {5: -100.0}, "logprobs": 3}
    assert vllm_args.sampling_kwargs(SamplingParams(logprobs=True), [])["logprobs"] == 0  # the sampled token only
    # vLLM honours stop_token_ids even with ignore_eos: the end-of-turn ids must not go there
    params.ignore_eos = True
    assert vllm_args.sampling_kwargs(params, [2, 7])["stop_token_ids"] == []
    args = vllm_args.engine_args("/m", gpu_memory=0.5, max_lora_rank=12, max_loras=3, max_model_len=2048)
    assert args == {"model": "/m", "enable_lora": True, "max_loras": 3, "max_lora_rank": 16,
                    "gpu_memory_utilization": 0.5, "max_model_len": 2048}
    assert vllm_args.finish_reason("length") == "length" and vllm_args.finish_reason("stop") == "stop"
    with pytest.raises(EngineError, match="retry"):
        vllm_args.finish_reason("abort")
    for reason in ("error", "repetition"):
        with pytest.raises(EngineError, match=reason):
            vllm_args.finish_reason(reason)
    with pytest.raises(EngineError, match="smaller r"):
        vllm_args.lora_rank_limit(1024)


def test_vllm_checks_adapter_weights_before_vllm_sees_them(lora_dirs, tmp_path):
    from sage_ray.serve.engines.artifacts import check_adapter_weights

    check_adapter_weights(str(lora_dirs["a1"]), "a1")
    config = json.loads((lora_dirs["a1"] / "adapter_config.json").read_text())
    for name, weights, rank in (("corrupt", b"not a safetensors file", 4),
                                ("wrong_rank", (lora_dirs["a1"] / "adapter_model.safetensors").read_bytes(), 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, "r": rank}))
        (tmp_path / name / "adapter_model.safetensors").write_bytes(weights)
        with pytest.raises(EngineError, match="re-export the adapter"):
            check_adapter_weights(str(tmp_path / name), name)


def test_vllm_gpu_memory_option_and_env(monkeypatch):
    from sage_ray.serve.engines.vllm_args import resolve_gpu_memory

    monkeypatch.delenv("SAGE_STUDIO_LLM_GPU_MEMORY", raising=False)
    assert resolve_gpu_memory() == 0.85
    monkeypatch.setenv("SAGE_STUDIO_LLM_GPU_MEMORY", "0.6")
    assert resolve_gpu_memory() == 0.6 and resolve_gpu_memory(0.7) == 0.7
    monkeypatch.setenv("SAGE_STUDIO_LLM_GPU_MEMORY", "lots")
    with pytest.raises(EngineError, match="0.85"):
        resolve_gpu_memory()


def test_model_spec_and_params_validate():
    assert ModelSpec("m", "/models/m", "merged").full_model_path == "/models/m"
    assert ModelSpec("l", "/loras/l", "lora", base_path="/models/b").full_model_path == "/models/b"
    with pytest.raises(EngineError, match="kind"):
        ModelSpec("m", "/x", "checkpoint")
    with pytest.raises(EngineError, match="base_path"):
        ModelSpec("l", "/nowhere", "lora").full_model_path
    with pytest.raises(EngineError, match="temperature"):
        SamplingParams(temperature=-1)
    assert SamplingParams(stop="x").stop == ["x"]


def test_vllm_on_cpu_refuses_a_gpu_memory_share_instead_of_ignoring_it(monkeypatch):
    from tests.engine_support import require_vllm

    require_vllm()
    from sage_ray.serve.engines.vllm import VLLMEngine

    monkeypatch.delenv("SAGE_STUDIO_LLM_GPU_MEMORY", raising=False)
    with pytest.raises(EngineError, match="cpu_kv_cache_gb"):
        VLLMEngine(gpu_memory_utilization=0.5)._device_options()
    monkeypatch.setenv("SAGE_STUDIO_LLM_GPU_MEMORY", "0.6")
    with pytest.raises(EngineError, match="SAGE_STUDIO_LLM_GPU_MEMORY"):
        VLLMEngine()._device_options()
    monkeypatch.delenv("SAGE_STUDIO_LLM_GPU_MEMORY")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # restored after the test: the engine sets it
    assert VLLMEngine(cpu_kv_cache_gb=2)._device_options()["dtype"] == "float32"  # the CPU's own sizing is taken
