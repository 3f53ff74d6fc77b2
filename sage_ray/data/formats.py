"""Detect a record's dataset format, validate it, and normalise it to chat messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sage_ray.data.chat import chat_style, is_learned, parse_tools, parse_turns, with_system
from sage_ray.data.errors import DatasetError, json_type

FORMATS = ("alpaca", "qa", "conversations", "sharegpt", "text", "preference", "openai_dpo", "kto")

# What a format's records train: supervised replies, chosen/rejected pairs, or labelled replies.
KINDS = {"alpaca": "sft", "qa": "sft", "conversations": "sft", "sharegpt": "sft", "text": "sft",
         "preference": "pairs", "openai_dpo": "pairs", "kto": "labelled"}

# What each format looks like, for "unknown format" messages.
ACCEPTED = {
    "alpaca": '{"instruction", "input"?, "output", "system"?}',
    "qa": '{"question", "answer", "context"?}',
    "conversations": '{"messages" or "conversations": [{"role", "content"}], "tools"?}',
    "sharegpt": '{"conversations": [{"from", "value"}], "tools"?}',
    "text": '{"text"}',
    "preference": '{"prompt" or "messages" or "conversations", "chosen", "rejected"}',
    "openai_dpo": '{"input": {"messages"}, "preferred_output", "non_preferred_output"}',
    "kto": '{"messages" or "prompt"+"completion", "label": true|false}',
}

# Keys that change what a record means; a format that does not use one refuses it, never drops it.
MEANINGFUL = ("label", "chosen", "rejected", "weight", "loss_weight", "tools", "system")

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
    """One record, normalised. SFT: `messages` (or `text`); pairs: the prompt in `messages`,
    the replies in `chosen` / `rejected`; labelled (KTO): the prompt in `messages`, the reply
    in `completion`, `label` True when it is desirable."""

    messages: list[dict] | None = None
    """[{"role": "system"|"user"|"assistant"|"tool", "content": str, "tool_calls"?}]."""
    text: str | None = None
    """Raw text, trained on whole (the "text" format only)."""
    tools: list[dict] | None = None
    """Function schemas the chat template renders ({"type": "function", "function": {...}})."""
    weights: list[float | None] | None = None
    """Per message: 0 masks an assistant turn out of the loss; None or 1 is the default."""
    chosen: list[dict] | None = None
    rejected: list[dict] | None = None
    completion: list[dict] | None = None
    label: bool | None = None
    where: str | None = field(default=None, compare=False)
    """"file, line N": for errors found later (tokenising)."""


def detect_format(record: dict, chat_default: str = "conversations") -> str | None:
    """The format a record is written in, or None when its keys match none.

    Keys that make a record preference data win over the chat keys, so chosen/rejected or a
    label is never dropped. Other extra keys (ids, categories) are ignored. A "conversations"
    list whose turns show neither role/content nor from/value (e.g. empty) gets
    `chat_default`, so one bad record in a ShareGPT file is reported as bad, not as a second format.
    """
    if "preferred_output" in record or "non_preferred_output" in record:
        return "openai_dpo"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "label" in record:
        return "kto"
    for key in ("messages", "conversations"):
        if key in record:
            return chat_style(record[key]) or chat_default
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


def string_field(record: dict, key: str, fail: Fail, required: bool = True) -> str | None:
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


def refuse_unused(record: dict, used: tuple[str, ...], fmt: str, fail: Fail) -> None:
    """A key that changes meaning but that `fmt` has no place for is an error, not ignored."""
    for key in MEANINGFUL:
        if key in record and key not in used:
            raise fail(f"field '{key}' has no meaning in the {fmt} format ({ACCEPTED[fmt]}), and "
                       "ignoring it would train something else than the record says",
                       f"remove '{key}', or write the record in a format that uses it "
                       "(tools and weights: the messages format; chosen/rejected: preference; "
                       "label: kto)", key)


def alpaca_prompt(record: dict, fail: Fail) -> list[dict]:
    """The system and user messages of an alpaca record (instruction, input, system)."""
    instruction = string_field(record, "instruction", fail)
    extra = string_field(record, "input", fail, required=False)
    system = string_field(record, "system", fail, required=False)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": user}]


def _alpaca(record: dict, fail: Fail) -> Example:
    refuse_unused(record, ("system",), "alpaca", fail)
    messages = alpaca_prompt(record, fail)
    output = string_field(record, "output", fail)
    return Example(messages=messages + [{"role": "assistant", "content": output}])


def _qa(record: dict, fail: Fail) -> Example:
    refuse_unused(record, (), "qa", fail)
    question = string_field(record, "question", fail)
    answer = string_field(record, "answer", fail)
    context = string_field(record, "context", fail, required=False)
    user = f"Context:\n{context}\n\nQuestion: {question}" if context and context.strip() else question
    return Example(messages=[{"role": "user", "content": user},
                             {"role": "assistant", "content": answer}])


def _chat(record: dict, fail: Fail, sharegpt: bool) -> Example:
    fmt = "sharegpt" if sharegpt else "conversations"
    refuse_unused(record, ("tools", "system"), fmt, fail)
    key = "messages" if "messages" in record else "conversations"
    messages, weights = parse_turns(record[key], fail, key, sharegpt)
    messages = with_system(messages, record.get("system"), fail)
    if len(weights) < len(messages):
        weights = [None] + weights
    learned = [m for m, w in zip(messages, weights) if is_learned(m) and w != 0]
    if not learned:
        what = ("is empty" if not messages else "has no assistant turn with text" if
                not any(is_learned(m) for m in messages) else "has weight 0 on every assistant turn")
        raise fail(f"field '{key}' {what}",
                   "add at least one assistant turn with non-empty text (and weight 1): that is "
                   "what the model learns to say", key)
    tools = parse_tools(record.get("tools"), fail)
    return Example(messages=messages, tools=tools,
                   weights=weights if any(w is not None for w in weights) else None)


def _text(record: dict, fail: Fail) -> Example:
    refuse_unused(record, (), "text", fail)
    return Example(text=string_field(record, "text", fail))


def to_example(record: dict, fmt: str, *, path: str = "<data>",
               location: str | None = None) -> Example:
    """Validate `record` as format `fmt` and normalise it.

    Raises DatasetError naming `path`, `location` (e.g. "line 3") and the field.
    """
    from sage_ray.data.preference import kto_example, openai_dpo_example, pair_example

    def fail(problem: str, fix: str, field: str | None = None) -> DatasetError:
        return DatasetError(path, problem, fix, location, field)

    parsers = {"alpaca": _alpaca, "qa": _qa, "text": _text, "preference": pair_example,
               "openai_dpo": openai_dpo_example, "kto": kto_example,
               "conversations": lambda r, f: _chat(r, f, sharegpt=False),
               "sharegpt": lambda r, f: _chat(r, f, sharegpt=True)}
    if fmt not in parsers:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")
    example = parsers[fmt](record, fail)
    example.where = f"{path}, {location}" if location else path
    return example
