"""The chat template builds the training text, and the loss covers exactly the assistant tokens."""

from __future__ import annotations

import pytest

from sage_ray.data import Example
from sage_ray.data.tokenize import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    assistant_spans,
    ensure_chat_template,
    render,
    tokenize_example,
    tokenize_examples,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3, spelled out?"},
    {"role": "assistant", "content": "Six, which is 3 + 3."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ensure_chat_template(tok)
    return tok


def labelled_runs(item) -> list[list[int]]:
    """Contiguous runs of trained token ids."""
    runs, current = [], []
    for tok, label in zip(item.input_ids, item.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tok
            current.append(tok)
    return runs + ([current] if current else [])


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    item = tokenize_example(tokenizer, Example(messages=CONVERSATION), max_length=512)
    runs = labelled_runs(item)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == [reply + "<|im_end|>" for reply in replies]
    # every other token, system and user turns included, is masked
    trained = sum(len(run) for run in runs)
    assert sum(label != IGNORE_INDEX for label in item.labels) == trained
    assert trained < len(item.input_ids) / 2


def test_training_text_is_what_serving_renders(tokenizer):
    text, spans = assistant_spans(tokenizer, CONVERSATION)
    assert text == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    for (start, _end), turn in zip(spans, (2, 4)):
        # serving sends the history with the generation prompt; training continues exactly there
        prompt = tokenizer.apply_chat_template(CONVERSATION[:turn], tokenize=False, add_generation_prompt=True)
        assert text[:start] == prompt
    item = tokenize_example(tokenizer, Example(messages=CONVERSATION), max_length=512)
    assert item.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert item.input_ids[-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # ends with end-of-turn


def test_train_on_prompt_trains_every_token(tokenizer):
    item = tokenize_example(tokenizer, Example(messages=CONVERSATION), max_length=512, train_on_prompt=True)
    assert item.labels == item.input_ids


def test_text_records_train_on_whole_text_plus_eos(tokenizer):
    item = tokenize_example(tokenizer, Example(text="plain text"), max_length=512)
    assert item.labels == item.input_ids and item.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(item.input_ids[:-1]) == "plain text"


def test_truncation_and_dropping_are_counted(tokenizer):
    fits = len(tokenize_example(tokenizer, Example(messages=CONVERSATION), max_length=4096).input_ids)
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    items, stats = tokenize_examples(
        tokenizer, [Example(messages=CONVERSATION), Example(messages=long_prompt)], max_length=fits
    )
    assert stats.records == 2 and stats.truncated == 1 and stats.dropped == 1 and len(items) == 1
    assert stats.as_dict()["tokens"] == len(items[0].input_ids) == fits


def test_template_less_tokenizer_gets_default_template_ending_in_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    ensure_chat_template(tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    text = render(tok, CONVERSATION[:3])
    assert text.endswith("4." + tok.eos_token + "\n")
    item = tokenize_example(tok, Example(messages=CONVERSATION[:3]), max_length=512)
    assert tok.decode(labelled_runs(item)[0]) == "4." + tok.eos_token
