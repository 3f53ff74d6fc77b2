"""Load a base, merged or LoRA model folder and answer a chat, with the model's own template.

This is the small in-process path used by `sage finetune quickstart` and the tests; the
served path (batching, hot swap) is sage_ray.serve.
"""

from __future__ import annotations

from pathlib import Path


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


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
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 128, streamer=None,
                   repetition_penalty: float = 1.0) -> str:
    """Greedy reply to `messages`; tokens go to `streamer` as they come when one is given."""
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_token_ids(model, tokenizer),
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, streamer=streamer,
                                repetition_penalty=repetition_penalty)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
