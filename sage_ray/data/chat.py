"""Chat turns as users write them, normalised to the messages a chat template takes.

Accepted: OpenAI's chat fine-tuning format (text content parts, a `weight` of 0 or 1 on
assistant messages, `tools`, assistant `tool_calls`, `tool` messages), ShareGPT (`from` /
`value`, with LLaMA-Factory's `function_call` / `observation` turns and a `tools` JSON
string) and LLaMA-Factory's typed content parts with a per-turn `loss_weight`.
The output is HF's message convention: {"role", "content"} plus "tool_calls" with
arguments as objects, so the model's own template renders tools the way serving does.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from sage_ray.data.errors import DatasetError, json_type

Fail = Callable[..., DatasetError]

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "function": "tool"}  # OpenAI's legacy name for a tool result
# ShareGPT exports also use plain role names now and then; accept them as aliases.
# "function_call" is an assistant turn that calls a tool, "observation" the tool's result.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}
_ROLE_NAMES = {False: "'system', 'user', 'assistant', 'tool'",
               True: "'human', 'gpt', 'system', 'function_call', 'observation'"}


def chat_style(items: Any) -> str | None:
    """"sharegpt" or "conversations" by the keys of the turns; None with no evidence."""
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                if "role" in item or "content" in item:
                    return "conversations"
                if "from" in item or "value" in item:
                    return "sharegpt"
    return None


def parse_tools(value: Any, fail: Fail, field: str = "tools") -> list[dict] | None:
    """`tools` as a list of {"type": "function", "function": {...}}; a JSON string (ShareGPT)
    or bare function schemas are accepted; an empty list means no tools."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as err:
            raise fail(f"field '{field}' is a string but not valid JSON ({err.msg})",
                       f"write '{field}' as a JSON list of function schemas", field) from None
    if not isinstance(value, list):
        raise fail(f"field '{field}' must be a list of function schemas, got {json_type(value)}",
                   f'write \'{field}\' as [{{"type": "function", "function": {{"name": ...}}}}]', field)
    tools = []
    for i, tool in enumerate(value):
        schema = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise fail(f"{field}[{i}] has no function 'name'",
                       'describe each tool as {"type": "function", "function": {"name", "description", '
                       '"parameters"}}', f"{field}[{i}]")
        tools.append({"type": "function", "function": schema})
    return tools or None


def _arguments(value: Any, fail: Fail, at: str) -> dict:
    """Call arguments as an object: chat templates serialise them themselves."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise fail(f"{at} is not valid JSON ({err.msg})",
                       "write the arguments as a JSON object (or a string holding one)", at) from None
    if not isinstance(value, dict):
        raise fail(f"{at} must be a JSON object, got {json_type(value)}",
                   'write the arguments as an object, e.g. {"city": "Paris"}', at)
    return value


def _call(value: Any, fail: Fail, at: str) -> dict:
    """One tool call, from OpenAI's {"type", "function": {name, arguments}} or a bare
    {"name", "arguments"} (ShareGPT's function_call value, OpenAI's legacy function_call)."""
    function = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise fail(f"{at} has no function 'name'",
                   'write a call as {"name": "...", "arguments": {...}}', at)
    call = {"type": "function", "function": {
        "name": function["name"], "arguments": _arguments(function.get("arguments", {}), fail,
                                                          f"{at}.arguments")}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def _text(content: Any, fail: Fail, at: str) -> str:
    """A turn's text: a string, or a list of text parts ({"type": "text", "text"|"value"})."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise fail(f"{at} is {json_type(content)}, not a string or a list of text parts",
                   "put the turn's text in it as a string", at)
    texts = []
    for i, part in enumerate(content):
        where = f"{at}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            found = json_type(part) if not isinstance(part, dict) else f"of type {kind!r}"
            raise fail(f"{where} is a content part {found}; only text parts can be trained (the "
                       "models sage-ray fine-tunes read text only)",
                       'keep only {"type": "text", "text": "..."} parts', where)
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            raise fail(f"{where} has no 'text' string", 'write a text part as {"type": "text", "text": "..."}',
                       where)
        texts.append(text)
    return "".join(texts)


def _weight(item: dict, role: str, fail: Fail, at: str) -> float | None:
    """OpenAI's `weight` or LLaMA-Factory's `loss_weight`: 0 (do not learn this turn) or 1."""
    key = "weight" if "weight" in item else "loss_weight" if "loss_weight" in item else None
    if key is None or item[key] is None:
        return None
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise fail(f"{at}.{key} is {value!r}; it must be 0 (do not learn this turn) or 1",
                   f"set '{key}' to 0 or 1", f"{at}.{key}")
    if value and role != "assistant":
        raise fail(f"{at}.{key} is 1 on a {role} turn; only assistant turns are learned",
                   f"remove '{key}' from the {role} turn, or train on every token with train_on_prompt: true",
                   f"{at}.{key}")
    return float(value)


def parse_turn(item: Any, fail: Fail, at: str, sharegpt: bool) -> tuple[dict, float | None]:
    """One turn as a message, and its training weight (None: the default, learned if assistant)."""
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    shape = f'{{"{role_key}": ..., "{content_key}": "..."}}'
    if not isinstance(item, dict):
        raise fail(f"{at} must be an object, got {json_type(item)}", f"write each turn as {shape}", at)
    raw = item.get(role_key)
    names = _ROLE_NAMES[sharegpt]
    role = (SHAREGPT_ROLES if sharegpt else ROLES).get(raw.strip().lower()) if isinstance(raw, str) else None
    if role is None:
        found = "missing" if role_key not in item else f"{raw!r}"
        raise fail(f"{at}.{role_key} is {found}; allowed roles: {names}",
                   f"set '{role_key}' to one of {names}", f"{at}.{role_key}")
    message: dict[str, Any] = {"role": role}
    content = item.get(content_key)
    calls = item.get("tool_calls") if not sharegpt else None
    if not sharegpt and calls is None and isinstance(item.get("function_call"), dict):
        calls = [item["function_call"]]  # OpenAI's legacy single call
    if sharegpt and raw.strip().lower() == "function_call":
        calls, content = _sharegpt_calls(content, fail, f"{at}.{content_key}"), ""
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list) or not calls:
            raise fail(f"{at}.tool_calls must be a non-empty list on an assistant turn",
                       "put tool calls only on assistant turns, as a list", f"{at}.tool_calls")
        message["tool_calls"] = [_call(c, fail, f"{at}.tool_calls[{i}]") for i, c in enumerate(calls)]
        content = "" if content is None else content
    if content is None or (content_key not in item and calls is None):
        raise fail(f"{at}.{content_key} is {'missing' if content_key not in item else 'null, not a string'}",
                   f"put the turn's text in '{content_key}' as a string", f"{at}.{content_key}")
    message["content"] = _text(content, fail, f"{at}.{content_key}")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(item.get(key), str):
                message[key] = item[key]
    return message, _weight(item, role, fail, at)


def _sharegpt_calls(value: Any, fail: Fail, at: str) -> list:
    """A function_call turn's value: a JSON object (or list of them) naming the function."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise fail(f"{at} of a function_call turn is not valid JSON ({err.msg})",
                       'write it as {"name": "...", "arguments": {...}}', at) from None
    return value if isinstance(value, list) else [value]


def parse_turns(items: Any, fail: Fail, key: str, sharegpt: bool) -> tuple[list[dict], list]:
    """Messages and per-message weights of a list of turns; a system turn only first."""
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(items, list):
        raise fail(f"field '{key}' must be a list of turns, got {json_type(items)}",
                   f'make \'{key}\' a list of turns like [{{"{role_key}": ..., "{content_key}": "..."}}, ...]',
                   key)
    messages, weights = [], []
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        message, weight = parse_turn(item, fail, at, sharegpt)
        if message["role"] == "system" and i > 0:
            raise fail(f"{at}.{role_key} is {item[role_key]!r}, but only the first turn may be a system turn",
                       "move the system turn to the start, or merge it into the first one", f"{at}.{role_key}")
        messages.append(message)
        weights.append(weight)
    return messages, weights


def with_system(messages: list[dict], system: Any, fail: Fail) -> list[dict]:
    """Put a record-level `system` (LLaMA-Factory's column) in front of the turns."""
    if system is None:
        return messages
    if not isinstance(system, str):
        raise fail(f"field 'system' must be a string, got {json_type(system)}",
                   "make 'system' a string, or leave it out", "system")
    if messages and messages[0]["role"] == "system":
        raise fail("the record has both a 'system' field and a system turn",
                   "keep one of the two", "system")
    return [{"role": "system", "content": system}] + messages if system.strip() else messages


def is_learned(message: dict) -> bool:
    """An assistant turn with something to learn: text or a tool call."""
    return message["role"] == "assistant" and bool(message["content"].strip() or message.get("tool_calls"))
