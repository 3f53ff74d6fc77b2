"""Load a base, merged or LoRA model folder and answer a chat, with the model's own template.

This is the small in-process path used by `sage finetune quickstart` and the tests; the
served path (batching, hot swap) is sage_ray.serve.
"""

from __future__ import annotations

from pathlib import Path

from sage_ray.artifacts import is_adapter


def load_chat_model(path: str | Path):
    """(model, tokenizer) for a model folder or a LoRA adapter folder (its base is loaded too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_adapter(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the generation config plus the tokenizer's: a reply stops where training stopped."""
    return stop_ids_from(model.generation_config, tokenizer)


def stop_ids_from(generation_config, tokenizer) -> list[int]:
    """stop_token_ids from a GenerationConfig (or None) instead of a loaded model (vLLM holds no HF model)."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Prompt ids for `messages` with the tokenizer's chat template and the assistant turn opened.

    The template is the one saved with the served artifact (an adapter folder carries the
    one used in training), so serving formats prompts exactly as training did.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat template: "
            "serve an instruct/chat model, or a fine-tune (its folder carries the template used in training)"
        )
    extra = {"tools": tools} if tools else {}  # OpenAI-style tool definitions, rendered by the template
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, **extra)
    return list(ids["input_ids"])


def renders_tools(tokenizer) -> bool:
    """The chat template uses the `tools` variable (transformers' convention for tool calling)."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def generate_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 128, streamer=None,
                   repetition_penalty: float = 1.0) -> str:
    """Greedy reply to `messages`; tokens go to `streamer` as they come when one is given."""
    import torch

    prompt = torch.tensor([encode_chat(tokenizer, messages)])
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_token_ids(model, tokenizer),
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, streamer=streamer,
                                repetition_penalty=repetition_penalty)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
