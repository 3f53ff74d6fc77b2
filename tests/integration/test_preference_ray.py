"""Preference training (DPO, ORPO, KTO) and tool-calling SFT of the tiny model on the session's
Ray cluster, through `finetune` as a user runs it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from sage_ray import TrainConfig, finetune

PAIRS = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart" / "preference.jsonl"
_RUNS: dict = {}


def run_once(name: str, **fields):
    """One fine-tune per name, shared by the tests of this module."""
    if name not in _RUNS:
        defaults = {"batch_size": 4, "max_length": 128, "save_steps": 100, "cpus_per_worker": 1}
        cfg = TrainConfig(name=name, **{**defaults, **fields})
        _RUNS[name] = finetune(cfg)
    return _RUNS[name]


def reply_logps(model, tokenizer, prompt: list[dict], reply: list[dict]) -> tuple[float, float]:
    """Summed and mean log-probability of `reply` after `prompt`, both rendered by the chat template."""
    from sage_ray.data.tokenize import render

    prompt_ids = tokenizer(render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer(render(tokenizer, prompt + reply), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    reply_part = logps[len(prompt_ids) - 1:]
    return reply_part.sum().item(), reply_part.mean().item()


def pair_logps(model, tokenizer, examples) -> list[tuple[tuple, tuple]]:
    return [(reply_logps(model, tokenizer, e.messages, e.chosen), reply_logps(model, tokenizer, e.messages, e.rejected))
            for e in examples]


def test_dpo_raises_preference_accuracy_above_the_base(ray_cluster, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sage_ray.data import load_dataset
    from sage_ray.data.tokenize import load_tokenizer

    result = run_once("dpo-tiny", model=str(tiny_model_dir), data=str(PAIRS), method="dpo", max_steps=10, lr=5e-3)
    lora = result.paths.lora
    assert not (lora / "ref").exists()  # TRL's frozen reference copy is not part of the adapter

    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = load_dataset(PAIRS, method="dpo").examples
    base = pair_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, examples)
    policy_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).eval()
    policy = pair_logps(policy_model, tokenizer, examples)

    def accuracy(logps) -> float:  # the reply the model finds likelier per token is the chosen one
        return sum(chosen[1] > rejected[1] for chosen, rejected in logps) / len(logps)

    # DPO's implicit reward: log-prob gained over the base; the base itself gains nothing on any pair
    rewards = [(pc[0] - bc[0], pr[0] - br[0]) for (bc, br), (pc, pr) in zip(base, policy)]
    reward_accuracy = sum(chosen > rejected for chosen, rejected in rewards) / len(rewards)
    print(f"preference accuracy base {accuracy(base):.2f} -> dpo {accuracy(policy):.2f}; "
          f"reward accuracy base 0.00 -> dpo {reward_accuracy:.2f}")
    assert accuracy(policy) > accuracy(base)
    assert reward_accuracy >= 0.75

    meta = result.meta
    assert meta["config"]["method"] == "dpo" and meta["dataset"]["format"] == "preference"
    assert meta["metrics"]["final_metrics"]["rewards/accuracies"] > 0


def test_dpo_metrics_reach_the_registry_and_the_log(ray_cluster, tiny_model_dir):
    from sage_ray.registry.client import RegistryClient

    result = run_once("dpo-tiny", model=str(tiny_model_dir), data=str(PAIRS), method="dpo", max_steps=10, lr=5e-3)
    job = RegistryClient(ray_cluster.sage_home).get_job("dpo-tiny")
    assert job["status"] == "completed" and len(job["loss_history"]) == 10
    assert all(set(point[2]) >= {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"}
               for point in job["loss_history"])
    assert job["loss_history"][-1][2]["rewards/accuracies"] > job["loss_history"][0][2]["rewards/accuracies"]
    assert "rewards/accuracies" in result.paths.train_log.read_text()


def test_dpo_adapter_serves(ray_cluster, tiny_model_dir):
    """The serving engine loads the DPO adapter beside the base and generates what peft does with it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sage_ray.data.tokenize import load_tokenizer
    from sage_ray.inference import encode_chat
    from sage_ray.serve.engines import ModelSpec, SamplingParams, complete, create_engine

    lora = run_once("dpo-tiny", model=str(tiny_model_dir), data=str(PAIRS), method="dpo", max_steps=10,
                    lr=5e-3).paths.lora
    question = [{"role": "user", "content": "What is the capital of France?"}]

    async def serve_once():
        engine = create_engine("hf", device="cpu")
        await engine.start(ModelSpec("tiny", str(tiny_model_dir), "base"))
        try:
            await engine.load_adapter(ModelSpec("dpo-tiny-lora", str(lora), "lora", base_path=str(tiny_model_dir)))
            assert "dpo-tiny-lora" in engine.adapters
            params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            return await complete(engine.chat(question, adapter="dpo-tiny-lora", params=params))
        finally:
            await engine.shutdown()

    served = asyncio.run(serve_once())
    tokenizer = load_tokenizer(str(lora))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).eval()
    prompt = torch.tensor([encode_chat(tokenizer, question)])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=8, min_new_tokens=8, eos_token_id=[], pad_token_id=tokenizer.pad_token_id)
    assert served.completion_tokens == 8 and served.finish_reason == "length"
    assert served.text == tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_kto_and_orpo_runs_train(ray_cluster, tiny_model_dir, tmp_path, method):
    from safetensors.torch import load_file

    data = PAIRS
    if method == "kto":  # KTO's own shape: a conversation ending in the judged reply, and a label
        records = [json.loads(line) for line in PAIRS.read_text().splitlines()]
        data = tmp_path / "kto.jsonl"
        data.write_text("".join(json.dumps({"messages": r["prompt"] + r[key], "label": key == "chosen"}) + "\n"
                                for r in records for key in ("chosen", "rejected")))
    result = run_once(f"{method}-tiny", model=str(tiny_model_dir), data=str(data), method=method, max_steps=3,
                      lr=5e-3)
    weights = load_file(result.paths.lora / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in weights.items())
    history = result.meta["loss_history"]
    assert len(history) == 3 and all(loss == loss for _step, loss in history)  # no NaN
    expected = "kl" if method == "kto" else "log_odds_ratio"
    assert expected in result.meta["metrics"]["final_metrics"]
    assert result.meta["dataset"]["format"] == ("kto" if method == "kto" else "preference")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def tool_record(city: str, weather: str) -> dict:
    """An OpenAI chat fine-tuning record: a tool call, its result, the answer."""
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"city": city, "weather": weather})},
        {"role": "assistant", "content": f"It is {weather} in {city} right now."}]}


def test_tool_calling_sft_renders_tools_and_masks_results(ray_cluster, tiny_model_dir, tmp_path):
    from sage_ray.data import load_dataset
    from sage_ray.data.tokenize import IGNORE_INDEX, load_tokenizer, tokenize_example

    data = tmp_path / "tools.jsonl"
    cities = [("Paris", "sunny"), ("Oslo", "snowing"), ("Lima", "cloudy"), ("Cairo", "hot and dry")]
    data.write_text("".join(json.dumps(tool_record(c, w)) + "\n" for c, w in cities))
    # the tools' schema in the system turn makes these records ~300 tokens
    result = run_once("tools-tiny", model=str(tiny_model_dir), data=str(data), max_steps=4, lr=5e-3, max_length=512)
    assert result.meta["dataset"]["format"] == "conversations" and result.meta["metrics"]["steps"] == 4

    # the adapter's own tokenizer (what serving loads) renders the tools and the call
    tokenizer = load_tokenizer(str(result.paths.lora))
    example = load_dataset(data).examples[0]
    item = tokenize_example(tokenizer, example, max_length=512)
    text = tokenizer.decode(item.input_ids)
    trained = tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX])
    assert '"name": "get_weather"' in text.split("\n</tools>")[0]  # the schema, in the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained
    assert '"weather": "sunny"' in text and '"weather": "sunny"' not in trained  # the tool result is masked
    assert "It is sunny in Paris right now." in trained
