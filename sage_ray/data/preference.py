"""Preference records: chosen/rejected pairs (DPO, ORPO) and labelled replies (KTO).

Accepted shapes: `{prompt|messages|conversations|instruction, chosen, rejected}` with
ShareGPT or OpenAI turns (LLaMA-Factory's dpo files, TRL's conversational pairs),
OpenAI's DPO JSONL `{input: {messages, tools?}, preferred_output, non_preferred_output}`,
and KTO's `{messages, label}` or `{prompt, completion, label}`. The prompt is kept as
messages and the replies as assistant messages, so the trainer renders all of them
through the model's chat template, the way serving does.
"""

from __future__ import annotations

from typing import Any

from sage_ray.data.chat import chat_style, is_learned, parse_tools, parse_turn, parse_turns, with_system
from sage_ray.data.errors import json_type
from sage_ray.data.formats import Example, Fail, alpaca_prompt, refuse_unused

_PROMPT_KEYS = ("prompt", "messages", "conversations", "instruction")
_REPLY_SHAPE = 'a string, an assistant turn {"role": "assistant", "content": "..."}, or a list of them'


def _turns(value: Any, fail: Fail, key: str) -> list[dict]:
    """A list of turns in either style (the style is read off the turns)."""
    messages, weights = parse_turns(value, fail, key, sharegpt=chat_style(value) == "sharegpt")
    if any(w is not None for w in weights):
        at = next(i for i, w in enumerate(weights) if w is not None)
        raise fail(f"{key}[{at}] has a weight; preference training learns whole replies",
                   "remove 'weight' / 'loss_weight' from preference records", f"{key}[{at}]")
    return messages


def prompt_messages(record: dict, fail: Fail, *, allow_reply: bool = False) -> tuple[list[dict], str]:
    """The prompt as messages and the key it came from. The prompt must end on a user (or
    tool) turn, since the replies follow it; `allow_reply` lets KTO's conversation end on
    its assistant reply (split off by the caller)."""
    key = next((k for k in _PROMPT_KEYS if k in record), None)
    if key is None:
        raise fail("the record has no prompt", "put the conversation so far in 'prompt' (a string or "
                   "a list of turns), 'messages' or 'conversations'", "prompt")
    value = record[key]
    if key == "instruction":
        messages = alpaca_prompt(record, fail)
    elif key == "prompt" and isinstance(value, str):
        if not value.strip():
            raise fail("field 'prompt' is empty", "put the prompt text in 'prompt'", "prompt")
        messages = [{"role": "user", "content": value}]
    else:
        messages = _turns(value, fail, key)
    if key != "instruction":
        messages = with_system(messages, record.get("system"), fail)
    if not messages or (messages[-1]["role"] in ("assistant", "system") and not allow_reply):
        what = "is empty" if not messages else f"ends with a {messages[-1]['role']} turn"
        raise fail(f"the prompt in '{key}' {what}",
                   "end the prompt with the user turn the replies answer", key)
    return messages, key


def reply_messages(value: Any, fail: Fail, key: str) -> list[dict]:
    """A reply as assistant messages: a string, one turn, or a list of turns."""
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        messages = [parse_turn(value, fail, key, sharegpt=chat_style([value]) == "sharegpt")[0]]
    elif isinstance(value, list):
        messages = _turns(value, fail, key)
    else:
        found = "missing" if value is None else json_type(value)
        raise fail(f"field '{key}' is {found}", f"write '{key}' as {_REPLY_SHAPE}", key)
    if not any(is_learned(m) for m in messages):
        raise fail(f"field '{key}' has no assistant reply with text", f"write '{key}' as {_REPLY_SHAPE}", key)
    if any(m["role"] != "assistant" for m in messages):
        raise fail(f"field '{key}' holds a {next(m['role'] for m in messages if m['role'] != 'assistant')} "
                   "turn; a reply holds assistant turns only",
                   f"put the shared conversation in the prompt and only the replies in '{key}'", key)
    return messages


def pair_example(record: dict, fail: Fail) -> Example:
    """{prompt|messages|conversations|instruction, chosen, rejected}."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise fail(f"the record has '{'rejected' if key == 'chosen' else 'chosen'}' but no '{key}'",
                       f"preference pairs need both 'chosen' and 'rejected', each {_REPLY_SHAPE}", key)
    if "label" in record:
        raise fail("the record has both chosen/rejected and a 'label'",
                   "write pairs (chosen/rejected) or labelled replies (label), not both", "label")
    refuse_unused(record, ("chosen", "rejected", "tools", "system"), "preference", fail)
    prompt, _ = prompt_messages(record, fail)
    return Example(messages=prompt, tools=parse_tools(record.get("tools"), fail),
                   chosen=reply_messages(record["chosen"], fail, "chosen"),
                   rejected=reply_messages(record["rejected"], fail, "rejected"))


def openai_dpo_example(record: dict, fail: Fail) -> Example:
    """OpenAI's DPO fine-tuning JSONL."""
    refuse_unused(record, (), "openai_dpo", fail)
    source = record.get("input")
    if not isinstance(source, dict) or "messages" not in source:
        raise fail("field 'input' must be an object with 'messages'",
                   'write \'input\' as {"messages": [{"role": "user", "content": "..."}]}', "input")
    prompt, _ = prompt_messages({"messages": source["messages"]}, fail)
    return Example(messages=prompt, tools=parse_tools(source.get("tools"), fail, "input.tools"),
                   chosen=reply_messages(record.get("preferred_output"), fail, "preferred_output"),
                   rejected=reply_messages(record.get("non_preferred_output"), fail, "non_preferred_output"))


def kto_example(record: dict, fail: Fail) -> Example:
    """{messages|conversations, label} (the last assistant turn is the judged reply) or
    {prompt, completion, label}."""
    refuse_unused(record, ("label", "tools", "system"), "kto", fail)
    label = record["label"]
    if not isinstance(label, bool):
        raise fail(f"field 'label' must be true (a desirable reply) or false (an undesirable one), "
                   f"got {json_type(label)}", "set 'label' to true or false", "label")
    reply_key = "completion" if "completion" in record else "output" if "output" in record else None
    messages, key = prompt_messages(record, fail, allow_reply=reply_key is None)
    if reply_key is not None:
        completion = reply_messages(record[reply_key], fail, reply_key)
    else:
        if messages[-1]["role"] != "assistant":
            raise fail(f"'{key}' does not end with the assistant reply that 'label' judges",
                       f"end '{key}' with the assistant turn, or put it in 'completion'", key)
        completion, messages = messages[-1:], messages[:-1]
        if not messages or not is_learned(completion[0]):
            raise fail(f"'{key}' needs a prompt before the judged reply, and the reply needs text",
                       f"write '{key}' as the user turn(s) then the assistant reply", key)
    return Example(messages=messages, tools=parse_tools(record.get("tools"), fail),
                   completion=completion, label=label)
