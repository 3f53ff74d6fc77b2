"""Datasets as users bring them: LLaMA-Factory's demo files (tests/data/peer-data, Apache-2.0,
copied unchanged), OpenAI's chat and DPO fine-tuning formats, TRL's preference shapes; each accepted for the method it suits,
refused with file, record and field for the others, and rendered through the model's template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sage_ray.data import DatasetError, Example, load_dataset, parse_dataset_bytes
from sage_ray.data.tokenize import IGNORE_INDEX, ChatTemplateError, tokenize_example

PEER_DATA = Path(os.environ.get("SAGE_PEER_DATA", Path(__file__).resolve().parents[1] / "data" / "peer-data"))
METHODS = ("sft", "dpo", "orpo", "kto")

# file -> (format, records, the methods that accept it); every other method refuses it.
PEER_OUTCOMES = {
    "alpaca_en_demo.json": ("alpaca", 999, {"sft"}),
    "identity.json": ("alpaca", 91, {"sft"}),
    "glaive_toolcall_en_demo.json": ("sharegpt", 300, {"sft"}),
    "v1_sft_demo.jsonl": ("conversations", 500, {"sft"}),
    "dpo_en_demo.json": ("preference", 300, {"dpo", "orpo", "kto"}),
    "kto_en_demo.json": ("kto", 300, {"kto"}),
}
# What the refusal tells the user to do, by the file's kind of data.
REFUSAL_FIX = {"alpaca": "--method sft", "sharegpt": "--method sft", "conversations": "--method sft",
               "preference": "--method dpo", "kto": "--method kto"}


def peer(name: str) -> Path:
    path = PEER_DATA / name
    if not path.exists():
        pytest.fail(f"peer dataset {path} is missing: tests/data/peer-data ships them (or set SAGE_PEER_DATA)")
    return path


def load(tmp_path: Path, *records: dict, method: str | None = "sft"):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_dataset(path, method=method)


def refusal(tmp_path: Path, *records: dict, method: str | None = "sft") -> DatasetError:
    with pytest.raises(DatasetError) as info:
        load(tmp_path, *records, method=method)
    assert "d.jsonl" in str(info.value) and "line " in str(info.value) and "Fix: " in str(info.value)
    return info.value


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from sage_ray.data.tokenize import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_peer_data_folder_holds_exactly_the_known_files():
    files = {p.name for p in PEER_DATA.glob("*.json*")} if PEER_DATA.exists() else set()
    if not files:
        pytest.skip(f"no peer data at {PEER_DATA}")
    assert files == set(PEER_OUTCOMES), "a new peer file needs its outcome in PEER_OUTCOMES"


@pytest.mark.parametrize("name", sorted(PEER_OUTCOMES))
def test_every_peer_file_for_every_method(name):
    fmt, records, accepted = PEER_OUTCOMES[name]
    for method in METHODS:
        if method in accepted:
            dataset = load_dataset(peer(name), method=method)
            assert (dataset.format, len(dataset)) == (fmt, records), method
            continue
        with pytest.raises(DatasetError) as info:
            load_dataset(peer(name), method=method)
        err = info.value
        assert err.path.endswith(name) and err.field == "method" and err.location in ("record 1", "line 1")
        assert f"method {method!r}" in str(err) and REFUSAL_FIX[fmt] in err.fix, str(err)


def test_kto_data_is_never_trained_as_sft():
    with pytest.raises(DatasetError) as info:
        load_dataset(peer("kto_en_demo.json"))  # the default method is sft
    assert "looks like KTO data" in str(info.value) and "labelled false would be learned" in str(info.value)
    examples = load_dataset(peer("kto_en_demo.json"), method="kto").examples
    assert sum(e.label is False for e in examples) == 150 and sum(e.label is True for e in examples) == 150
    first = examples[0]
    assert [m["role"] for m in first.messages] == ["user"] and first.completion[0]["role"] == "assistant"
    assert first.completion[0]["content"].startswith("Ooh ooh ah ah!")


def test_dpo_demo_is_prompt_chosen_rejected():
    with pytest.raises(DatasetError) as info:
        load_dataset(peer("dpo_en_demo.json"))
    assert "looks like preference data (chosen/rejected pairs)" in str(info.value)
    example = load_dataset(peer("dpo_en_demo.json"), method="dpo").examples[0]
    assert example.messages[-1]["role"] == "user" and example.messages[-1]["content"].startswith("Hi! I'd like")
    assert example.chosen[0]["content"].startswith("That sounds like a fun") and example.rejected[0]["role"] == "assistant"


def test_glaive_tool_calls_observations_and_tools(tokenizer):
    dataset = load_dataset(peer("glaive_toolcall_en_demo.json"))
    example = dataset.examples[0]
    assert example.tools[0] == {"type": "function", "function": json.loads(
        json.loads(Path(peer("glaive_toolcall_en_demo.json")).read_text())[0]["tools"])[0]}
    call = next(m for m in example.messages if m.get("tool_calls"))
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"] == {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}
    assert any(m["role"] == "tool" and m["content"].startswith('{"recipes"') for m in example.messages)
    assert sum(1 for e in dataset.examples if e.tools is None) == 109  # '[]' means no tools
    item = tokenize_example(tokenizer, example, max_length=2048)
    text = tokenizer.decode(item.input_ids)
    assert "<tools>" in text and "search_recipes" in text and "<tool_response>" in text
    trained = tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX])
    assert '<tool_call>\n{"name": "search_recipes"' in trained  # the model learns to call the tool
    assert "Chicken and Bell Pepper Stir Fry" not in trained.split("</tool_call>")[0]
    assert "<tool_response>" not in trained and '{"recipes"' not in trained  # tool results are masked


def test_v1_typed_parts_and_loss_weights():
    example = load_dataset(peer("v1_sft_demo.jsonl")).examples[0]
    assert example.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! I am {{name}}, an AI assistant developed by {{author}}. "
                                         "How can I assist you today?"}]
    assert example.weights == [0.0, 1.0]


def test_placeholders_are_left_as_they_are():
    example = load_dataset(peer("identity.json")).examples[0]
    assert "{{name}}" in example.messages[-1]["content"] and "{{author}}" in example.messages[-1]["content"]


# ---- OpenAI's chat fine-tuning format -------------------------------------------------

OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}]
OPENAI_RECORD = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": "Let me look that up first.", "weight": 0},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny and 21 C.", "weight": 1},
    ],
    "tools": OPENAI_TOOLS,
}


def test_openai_chat_format_parts_weights_tools(tmp_path, tokenizer):
    example = load(tmp_path, OPENAI_RECORD).examples[0]
    assert example.messages[1]["content"] == "Weather in Paris?"
    assert example.messages[3]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert example.messages[4] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}
    assert example.weights == [None, None, 0.0, None, None, 1.0] and example.tools == OPENAI_TOOLS
    item = tokenize_example(tokenizer, example, max_length=1024)
    trained = tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX])
    assert "get_weather" in trained and "Sunny and 21 C." in trained
    assert "Let me look that up" not in trained  # weight 0: masked
    assert "sunny, 21 C" not in trained  # the tool result: masked
    assert "get_weather" in tokenizer.decode(item.input_ids[:40]) or "<tools>" in tokenizer.decode(item.input_ids)


def test_tools_with_a_template_that_cannot_render_them_are_refused(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from sage_ray.data.tokenize import DEFAULT_CHAT_TEMPLATE

    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain.chat_template = DEFAULT_CHAT_TEMPLATE  # knows nothing of tools
    example = load(tmp_path, OPENAI_RECORD).examples[0]
    with pytest.raises(ChatTemplateError, match=r"d.jsonl, line 1: .*does not render tools.*'get_weather'"):
        tokenize_example(plain, example, max_length=1024)


@pytest.mark.parametrize("turn,field,words", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content[0]",
     ["of type 'image_url'", "only text parts"]),
    ({"role": "user", "content": "hi", "weight": 1}, "messages[0].weight", ["only assistant turns"]),
    ({"role": "user", "content": "hi", "loss_weight": 0.5}, "messages[0].loss_weight", ["must be 0"]),
    ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0]", ["no 'text' string"]),
    ({"role": "user", "tool_calls": [{"function": {"name": "f"}}], "content": "x"}, "messages[0].tool_calls",
     ["assistant turn"]),
])
def test_bad_openai_turns_are_named(tmp_path, turn, field, words):
    err = refusal(tmp_path, {"messages": [turn, {"role": "assistant", "content": "ok"}]})
    assert err.field == field and all(w in str(err) for w in words), str(err)


def test_bad_tool_call_arguments_and_tools(tmp_path):
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}
    err = refusal(tmp_path, {"messages": [{"role": "user", "content": "u"}, call]})
    assert err.field == "messages[1].tool_calls[0].arguments" and "not valid JSON" in str(err)
    err = refusal(tmp_path, {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
                             "tools": [{"description": "no name"}]})
    assert err.field == "tools[0]"


def test_all_weights_zero_is_refused(tmp_path):
    err = refusal(tmp_path, {"messages": [{"role": "user", "content": "u"},
                                          {"role": "assistant", "content": "a", "weight": 0}]})
    assert "weight 0 on every assistant turn" in str(err)


@pytest.mark.parametrize("record,field", [
    ({"instruction": "i", "output": "o", "label": False}, "method"),  # kto-shaped: refused for sft
    ({"instruction": "i", "output": "o", "tools": []}, "tools"),
    ({"instruction": "i", "output": "o", "weight": 0}, "weight"),
    ({"question": "q", "answer": "a", "system": "s"}, "system"),
    ({"text": "t", "chosen": "c"}, "method"),  # preference-shaped: refused for sft
])
def test_keys_that_change_meaning_are_never_ignored(tmp_path, record, field):
    assert refusal(tmp_path, record).field == field


def test_record_level_system_is_used(tmp_path):
    example = load(tmp_path, {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}],
                              "system": "Be kind."}).examples[0]
    assert example.messages[0] == {"role": "system", "content": "Be kind."}


# ---- preference shapes -----------------------------------------------------------------

PAIR = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}


@pytest.mark.parametrize("record", [
    PAIR,
    {"prompt": [{"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon."}]},
    {"conversations": [{"from": "human", "value": "Capital of France?"}],
     "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Lyon."}},
    {"instruction": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    {"input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
     "preferred_output": [{"role": "assistant", "content": "Paris."}],
     "non_preferred_output": [{"role": "assistant", "content": "Lyon."}]},
])
def test_every_pair_shape_gives_the_same_example(tmp_path, record):
    dataset = load(tmp_path, record, method="dpo")
    assert dataset.kind == "pairs"
    assert dataset.examples == [Example(messages=[{"role": "user", "content": "Capital of France?"}],
                                        chosen=[{"role": "assistant", "content": "Paris."}],
                                        rejected=[{"role": "assistant", "content": "Lyon."}])]


@pytest.mark.parametrize("record,field,words", [
    ({"prompt": "p", "chosen": "c"}, "rejected", ["no 'rejected'"]),
    ({"prompt": "p", "chosen": "c", "rejected": 3}, "rejected", ["a number"]),
    ({"chosen": "c", "rejected": "r"}, "prompt", ["no prompt"]),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
      "chosen": "c", "rejected": "r"}, "messages", ["ends with a assistant turn"]),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
      "rejected": "r"}, "chosen", ["holds a user turn"]),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "label": True}, "label", ["not both"]),
    ({"input": {"prompt": "p"}, "preferred_output": "c", "non_preferred_output": "r"}, "input", ["'messages'"]),
    ({**PAIR, "weight": 0}, "weight", ["no meaning in the preference format"]),
])
def test_bad_pairs_are_named(tmp_path, record, field, words):
    err = refusal(tmp_path, record, method="dpo")
    assert err.field == field and all(w in str(err) for w in words), str(err)


def test_kto_shapes_and_label_checks(tmp_path):
    dataset = load(tmp_path, {"prompt": "p", "completion": "good", "label": True},
                   {"prompt": "p", "completion": "bad", "label": False}, method="kto")
    assert [(e.completion[0]["content"], e.label) for e in dataset.examples] == [("good", True), ("bad", False)]
    assert refusal(tmp_path, {"prompt": "p", "completion": "c", "label": 1}, method="kto").field == "label"
    err = refusal(tmp_path, {"messages": [{"role": "user", "content": "u"}], "label": True}, method="kto")
    assert err.field == "messages" and "judges" in str(err)


def test_mixed_labelled_and_plain_records_are_refused(tmp_path):
    plain = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    err = refusal(tmp_path, plain, {**plain, "label": False}, method=None)
    assert "mixes formats" in str(err) and "kto (1 record, first at line 2)" in str(err)


def test_upload_accepts_any_kind_and_training_checks_the_method():
    pair = json.dumps(PAIR).encode()
    assert parse_dataset_bytes(pair, "up.jsonl", method=None).kind == "pairs"
    with pytest.raises(DatasetError, match="use --method dpo"):
        parse_dataset_bytes(pair, "up.jsonl")


def test_preview_shows_preference_records_as_the_model_sees_them(tmp_path, tokenizer):
    from sage_ray.data.tokenize import preview_example

    pair = preview_example(tokenizer, load(tmp_path, PAIR, method=None).examples[0])
    assert pair["prompt"] == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert (pair["chosen"], pair["rejected"]) == ("Paris.<|im_end|>\n", "Lyon.<|im_end|>\n")
    bad = next(e for e in load_dataset(peer("kto_en_demo.json"), method="kto").examples if e.label is False)
    kto = preview_example(tokenizer, bad)
    assert kto["label"] is False and kto["completion"].endswith("<|im_end|>\n") and "chosen" not in kto
    sft = preview_example(tokenizer, load(tmp_path, OPENAI_RECORD).examples[0])
    assert "<tools>" in sft["rendered"] and "<tool_response>\nsunny, 21 C" in sft["rendered"]


def test_orpo_refuses_records_with_tools_it_cannot_render(tmp_path):
    record = {**PAIR, "tools": OPENAI_TOOLS}
    assert load(tmp_path, record, method="dpo").examples[0].tools == OPENAI_TOOLS
    err = refusal(tmp_path, record, method="orpo")
    assert err.field == "tools" and "--method dpo or kto" in str(err)
