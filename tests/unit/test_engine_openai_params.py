"""The hf engine honours the OpenAI sampling parameters it accepts: logprobs, presence and
frequency penalties, logit_bias, JSON-schema constrained decoding and raw prompts."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch

from sage_ray.serve.engines import EngineError, ModelSpec, SamplingParams, complete, create_engine
from sage_ray.serve.engines.grammar import GrammarError, json_grammar

QUESTION = [{"role": "user", "content": "Is Paris the capital of France? Answer in JSON."}]
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                                  "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["answer", "confidence"], "additionalProperties": False}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    engine = create_engine("hf", device="cpu", batch_wait_ms=50)
    run(engine.start(ModelSpec("tiny", str(tiny_model_dir), "base")))
    yield engine
    run(engine.shutdown())


def ask(engine, **params):
    return run(complete(engine.chat(QUESTION, params=SamplingParams(**params))))


def test_logprobs_match_the_model_and_top_logprobs_are_sorted(engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_ray.inference import encode_chat

    reply = ask(engine, max_tokens=4, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    assert len(reply.logprobs) == reply.completion_tokens == 4
    first = reply.logprobs[0]
    assert [t["logprob"] for t in first["top_logprobs"]] == sorted((t["logprob"] for t in first["top_logprobs"]),
                                                                    reverse=True)
    assert first["top_logprobs"][0]["token"] == first["token"]  # greedy: the chosen token is the likeliest
    assert bytes(b for t in reply.logprobs for b in t["bytes"]).decode(errors="replace") == reply.text
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([encode_chat(tokenizer, QUESTION)])).logits[0, -1]
    assert math.isclose(first["logprob"], float(torch.log_softmax(logits, -1).max()), abs_tol=1e-4)
    assert ask(engine, max_tokens=2, temperature=0).logprobs is None  # not asked: not computed


def test_frequency_penalty_and_logit_bias_change_the_reply(engine):
    plain = ask(engine, max_tokens=16, temperature=0, ignore_eos=True, logprobs=True)
    penalized = ask(engine, max_tokens=16, temperature=0, ignore_eos=True, frequency_penalty=2.0, logprobs=True)
    ids = [t["token"] for t in plain.logprobs]
    assert len(set(ids)) < len(ids), f"the greedy reply repeats no token; pick another prompt: {ids}"
    assert penalized.text != plain.text
    assert len({t["token"] for t in penalized.logprobs}) > len(set(ids))  # fewer repeats
    first_token = plain.logprobs[0]["token"]
    from transformers import AutoTokenizer

    banned = AutoTokenizer.from_pretrained(engine.base_path).convert_tokens_to_ids(
        engine._served.tokenizer.tokenize(first_token)[0])
    biased = ask(engine, max_tokens=4, temperature=0, ignore_eos=True, logit_bias={banned: -100}, logprobs=True)
    assert biased.logprobs[0]["token"] != first_token


def test_presence_penalty_is_bounded_and_applied(engine):
    with pytest.raises(EngineError, match="presence_penalty"):
        SamplingParams(presence_penalty=3)
    plain = ask(engine, max_tokens=16, temperature=0, ignore_eos=True)
    assert ask(engine, max_tokens=16, temperature=0, ignore_eos=True, presence_penalty=2.0).text != plain.text


def test_json_schema_is_enforced_greedy_and_sampled(engine):
    import jsonschema

    for params in ({"temperature": 0}, {"temperature": 1.2, "seed": 3}, {"temperature": 1.0, "seed": 11}):
        reply = ask(engine, max_tokens=40, json_schema=ANSWER_SCHEMA, **params)
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.text), ANSWER_SCHEMA)
    unconstrained = ask(engine, max_tokens=12, temperature=0)
    with pytest.raises(ValueError):
        json.loads(unconstrained.text)  # the random model does not write JSON by itself


def test_json_object_mode_starts_an_object_and_bad_schemas_are_refused(engine):
    reply = ask(engine, max_tokens=24, temperature=0, json_schema={"type": "object"})
    assert reply.text.lstrip().startswith("{")
    with pytest.raises(GrammarError, match="strin"):
        json_grammar({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(GrammarError, match="not"):
        json_grammar({"not": {"type": "string"}})


def test_raw_prompt_continues_the_text_without_a_chat_template(engine):
    stream = engine.generate("The capital of France is", params=SamplingParams(max_tokens=5, temperature=0,
                                                                              ignore_eos=True))
    reply = run(complete(stream))
    assert reply.completion_tokens == 5
    assert reply.prompt_tokens == len(engine._served.tokenizer("The capital of France is")["input_ids"])
    assert reply.prompt_tokens < ask(engine, max_tokens=1, temperature=0).prompt_tokens  # no template around it
