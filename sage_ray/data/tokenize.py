"""Turn examples into training ids with the base model's own chat template.

The training text of a conversation is exactly what `apply_chat_template` renders, so the
prompt a fine-tune learns is the prompt serving sends. Labels cover the assistant turns only
(content plus the end-of-turn token, so the model learns to stop); `train_on_prompt` covers
every token instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from sage_ray.errors import SageError

if TYPE_CHECKING:
    from sage_ray.data import Example

IGNORE_INDEX = -100

# Used only for a tokenizer without a chat template (a base model): the same ChatML shape as
# Qwen and SmolLM, closed by the tokenizer's own EOS so generation stops where training did.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(SageError, ValueError):
    """The model's chat template cannot be used to build masked training examples."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class DatasetStats:
    """What tokenisation found; shown before training and stored in finetune_meta.json."""

    records: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    max_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        mean = self.tokens / len(self.lengths) if self.lengths else 0
        return {"records": self.records, "tokens": self.tokens, "trainable_tokens": self.trainable_tokens,
                "truncated": self.truncated, "dropped": self.dropped, "max_tokens": self.max_tokens,
                "mean_tokens": round(mean, 1)}


def ensure_chat_template(tokenizer) -> None:
    """Give a template-less tokenizer the default one (saved with the adapter, so serving uses it)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(model_dir: str):
    """The model's tokenizer with a chat template (one is given when the model has none): the
    one training renders with and the Studio previews with."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_chat_template(tokenizer)
    return tokenizer


def end_of_turn_tokens(tokenizer) -> list[str]:
    """Texts of the tokens that end a turn: the EOS and any extra stop ids of the tokenizer."""
    texts = [tokenizer.eos_token] if tokenizer.eos_token else []
    for text in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if text in tokenizer.get_vocab() and text not in texts:
            texts.append(text)
    return texts


def render(tokenizer, messages: list[dict], *, tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> str:
    """The chat template's text, as serving renders it."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def check_tools_rendered(text: str, messages: list[dict], tools: list[dict] | None, where: str | None) -> None:
    """Refuse a record whose tools or tool calls the chat template leaves out: training on
    it would teach replies to tools the model never sees."""
    names = [t["function"]["name"] for t in tools or []]
    names += [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]
    missing = [name for name in names if name not in text]
    if missing:
        raise ChatTemplateError(
            f"{where or 'a record'}: the model's chat template does not render tools or tool calls "
            f"({', '.join(repr(n) for n in dict.fromkeys(missing))} missing from the text); use a base "
            "model whose template supports tools (e.g. Qwen2.5), or remove the tools from the data")


def assistant_spans(tokenizer, messages: list[dict], *, tools: list[dict] | None = None,
                    weights: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The full training text and the character spans of each learned assistant reply
    (those with a weight of 0 are left out).

    A span starts after the generation prompt and ends after the end-of-turn token, which is
    found by rendering the conversation up to each assistant turn.
    """
    text = render(tokenizer, messages, tools=tools)
    stops = end_of_turn_tokens(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (weights and weights[i] == 0):
            continue
        prompt = render(tokenizer, messages[:i], tools=tools, add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], tools=tools)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise ChatTemplateError(
                "the model's chat template renders earlier turns differently once later turns are added, "
                "so assistant tokens cannot be masked; train with train_on_prompt: true or use another template"
            )
        body = upto[len(prompt):]
        content_at = body.find(message["content"])
        after = content_at + len(message["content"]) if content_at >= 0 else 0
        ends = [body.find(stop, after) for stop in stops]
        ends = [(pos, stop) for pos, stop in zip(ends, stops) if pos >= 0]
        end = min(ends)[0] + len(min(ends)[1]) if ends else len(body)
        spans.append((len(prompt), len(prompt) + end))
    return text, spans


def tokenize_example(tokenizer, example: Example, *, max_length: int, train_on_prompt: bool = False) -> TokenizedExample:
    """ids and labels of one example, truncated to `max_length`."""
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        text, spans = assistant_spans(tokenizer, example.messages, tools=example.tools, weights=example.weights)
        check_tools_rendered(text, example.messages, example.tools, example.where)
        if spans and spans[-1][1] == len(text) and not any(text.endswith(s) for s in end_of_turn_tokens(tokenizer)):
            text += tokenizer.eos_token  # the template does not close the reply: add the stop token
            spans[-1] = (spans[-1][0], len(text))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if train_on_prompt:
            labels = list(ids)
        else:
            labels = [
                tok if any(start <= s < end for start, end in spans) else IGNORE_INDEX
                for tok, (s, _e) in zip(ids, enc["offset_mapping"])
            ]
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated)


def tokenize_examples(
    tokenizer, examples: Iterable[Example], *, max_length: int, train_on_prompt: bool = False
) -> tuple[list[TokenizedExample], DatasetStats]:
    """Tokenise a dataset; examples left with no trainable token after truncation are dropped."""
    stats, kept = DatasetStats(), []
    for example in examples:
        item = tokenize_example(tokenizer, example, max_length=max_length, train_on_prompt=train_on_prompt)
        stats.records += 1
        stats.truncated += item.truncated
        trainable = sum(label != IGNORE_INDEX for label in item.labels)
        if trainable == 0:
            stats.dropped += 1
            continue
        kept.append(item)
        stats.tokens += len(item.input_ids)
        stats.trainable_tokens += trainable
        stats.max_tokens = max(stats.max_tokens, len(item.input_ids))
        stats.lengths.append(len(item.input_ids))
    return kept, stats


def _continuation(tokenizer, prompt: list[dict], reply: list[dict], tools, prompt_text: str) -> str:
    """The text a reply adds after the rendered prompt (its end-of-turn token included)."""
    full = render(tokenizer, prompt + reply, tools=tools)
    return full[len(prompt_text):] if full.startswith(prompt_text) else full


def preview_example(tokenizer, example: Example) -> dict[str, Any]:
    """One record as the model will see it: the rendered conversation (SFT), or the rendered
    prompt and each reply after it (chosen / rejected, or KTO's completion and label)."""
    if example.messages is None:
        return {"messages": None, "text": example.text, "rendered": example.text}
    replies = {"chosen": example.chosen, "rejected": example.rejected, "completion": example.completion}
    if not any(replies.values()):
        return {"messages": example.messages, "text": None,
                "rendered": render(tokenizer, example.messages, tools=example.tools)}
    prompt = render(tokenizer, example.messages, tools=example.tools, add_generation_prompt=True)
    out: dict[str, Any] = {"messages": example.messages, "text": None, "prompt": prompt}
    for key, reply in replies.items():
        if reply:
            out[key] = _continuation(tokenizer, example.messages, reply, example.tools, prompt)
    if example.label is not None:
        out["label"] = example.label
    return out
