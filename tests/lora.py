"""LoRA adapters of the tiny model for tests, trained for real so their replies differ from the base."""

from __future__ import annotations

from pathlib import Path


def train_adapter(base_dir: Path, out: Path, text: str, seed: int) -> Path:
    """A real LoRA adapter: a few AdamW steps on one sentence, so its replies differ from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = tokenizer(text, return_tensors="pt")
    for _ in range(8):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
