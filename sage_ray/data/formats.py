"""Detect a record's dataset format, validate it, and normalise it to chat messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sage_ray.data.errors import DatasetError, json_type

FORMATS = ("alpaca", "qa", "conversations", "sharegpt", "text")

# What each format looks like, for "unknown format" messages.
ACCEPTED = {
    "alpaca": '{"instruction", "input"?, "output", "system"?}',
    "qa": '{"question", "answer", "context"?}',
    "conversations": '{"messages" or "conversations": [{"role", "content"}]}',
    "sharegpt": '{"conversations": [{"from", "value"}]}',
    "text": '{"text"}',
}

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# ShareGPT exports also use plain role names now and then; accept them as aliases.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "user": "user", "assistant": "assistant"}

# What to tell the user about each string field, and common names for them in other tools.
_FIELD_FIX = {
    "instruction": "put the task or prompt text in 'instruction'",
    "input": "make 'input' a string, or leave it out",
    "output": "put the answer text in 'output'",
    "system": "make 'system' a string, or leave it out",
    "question": "put the question text in 'question'",
    "answer": "put the answer text in 'answer'",
    "context": "make 'context' a string, or leave it out",
    "text": "put the training text in 'text'",
}
_ALIASES = {"prompt": "instruction", "completion": "output", "response": "output",
            "query": "question", "content": "text"}

Fail = Callable[..., DatasetError]


@dataclass
class Example:
    """One training example: chat messages, or raw text for the "text" format."""

    messages: list[dict[str, str]] | None = None
    """[{"role": "system"|"user"|"assistant", "content": str}], system only first."""
    text: str | None = None
    """Raw text, trained on whole (the "text" format only)."""


def _chat_style(items: Any) -> str | None:
    """"sharegpt" or "conversations" by the keys of the turns; None with no evidence."""
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                if "role" in item or "content" in item:
                    return "conversations"
                if "from" in item or "value" in item:
                    return "sharegpt"
    return None


def detect_format(record: dict, chat_default: str = "conversations") -> str | None:
    """The format a record is written in, or None when its keys match none.

    Extra keys (ids, categories) are ignored. A "conversations" list whose turns show
    neither role/content nor from/value (e.g. empty) gets `chat_default`, so one bad
    record in a ShareGPT file is reported as bad, not as a second format.
    """
    for key in ("messages", "conversations"):
        if key in record:
            return _chat_style(record[key]) or chat_default
    if "instruction" in record:
        return "alpaca"
    if "question" in record:
        return "qa"
    if "text" in record:
        return "text"
    return None


def unknown_format_error(record: dict, path: str, location: str | None) -> DatasetError:
    """The error for a record whose keys match no format, naming what is accepted."""
    keys = ", ".join(repr(k) for k in record) or "none (an empty object)"
    accepted = "; ".join(f"{name} {shape}" for name, shape in ACCEPTED.items())
    renames = [f"'{k}' -> '{_ALIASES[k]}'" for k in record if k in _ALIASES]
    fix = "rename the keys to match one format"
    if renames:
        fix += f" (for example {', '.join(renames)})"
    return DatasetError(path, f"record matches no known format; keys found: {keys}. "
                        f"Accepted formats: {accepted}", fix, location)


def _string(record: dict, key: str, fail: Fail, required: bool = True) -> str | None:
    """The string value of `key`; optional fields may be missing or null."""
    value = record.get(key)
    if value is None and (key not in record or not required):
        if required:
            raise fail(f"missing required field '{key}'", _FIELD_FIX[key], key)
        return None
    if not isinstance(value, str):
        raise fail(f"field '{key}' must be a string, got {json_type(value)}",
                   f"{_FIELD_FIX[key]}, as a string in double quotes", key)
    if required and not value.strip():
        raise fail(f"field '{key}' is empty", _FIELD_FIX[key], key)
    return value


def _alpaca(record: dict, fail: Fail) -> Example:
    instruction = _string(record, "instruction", fail)
    extra = _string(record, "input", fail, required=False)
    output = _string(record, "output", fail)
    system = _string(record, "system", fail, required=False)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(messages=messages)


def _qa(record: dict, fail: Fail) -> Example:
    question = _string(record, "question", fail)
    answer = _string(record, "answer", fail)
    context = _string(record, "context", fail, required=False)
    user = f"Context:\n{context}\n\nQuestion: {question}" if context and context.strip() else question
    return Example(messages=[{"role": "user", "content": user},
                             {"role": "assistant", "content": answer}])


def _chat(record: dict, fail: Fail, sharegpt: bool) -> Example:
    key = "messages" if "messages" in record else "conversations"
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else ROLES
    names = "'human', 'gpt', 'system'" if sharegpt else "'system', 'user', 'assistant'"
    shape = f'{{"{role_key}": ..., "{content_key}": "..."}}'
    items = record[key]
    if not isinstance(items, list):
        raise fail(f"field '{key}' must be a list of turns, got {json_type(items)}",
                   f"make '{key}' a list of turns like [{shape}, ...]", key)
    messages: list[dict[str, str]] = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise fail(f"{at} must be an object, got {json_type(item)}",
                       f"write each turn as {shape}", at)
        role = item.get(role_key)
        mapped = roles.get(role.strip().lower()) if isinstance(role, str) else None
        if mapped is None:
            found = "missing" if role_key not in item else f"{role!r}"
            raise fail(f"{at}.{role_key} is {found}; allowed roles: {names}",
                       f"set '{role_key}' to one of {names}", f"{at}.{role_key}")
        content = item.get(content_key)
        if not isinstance(content, str):
            found = "missing" if content_key not in item else f"{json_type(content)}, not a string"
            raise fail(f"{at}.{content_key} is {found}",
                       f"put the turn's text in '{content_key}' as a string",
                       f"{at}.{content_key}")
        if mapped == "system" and i > 0:
            raise fail(f"{at}.{role_key} is {role!r}, but only the first turn may be a system turn",
                       "move the system turn to the start, or merge it into the first one",
                       f"{at}.{role_key}")
        messages.append({"role": mapped, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        what = "is empty" if not messages else "has no assistant turn with text"
        raise fail(f"field '{key}' {what}",
                   "add at least one assistant turn with non-empty text: that is what "
                   "the model learns to say", key)
    return Example(messages=messages)


def _text(record: dict, fail: Fail) -> Example:
    return Example(text=_string(record, "text", fail))


def to_example(record: dict, fmt: str, *, path: str = "<data>",
               location: str | None = None) -> Example:
    """Validate `record` as format `fmt` and normalise it.

    Raises DatasetError naming `path`, `location` (e.g. "line 3") and the field.
    """

    def fail(problem: str, fix: str, field: str | None = None) -> DatasetError:
        return DatasetError(path, problem, fix, location, field)

    if fmt == "alpaca":
        return _alpaca(record, fail)
    if fmt == "qa":
        return _qa(record, fail)
    if fmt in ("conversations", "sharegpt"):
        return _chat(record, fail, sharegpt=fmt == "sharegpt")
    if fmt == "text":
        return _text(record, fail)
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")
