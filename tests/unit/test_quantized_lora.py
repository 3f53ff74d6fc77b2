"""QLoRA / 8-bit loading through bitsandbytes' CPU backend: LoRA on a quantized base still trains."""

from __future__ import annotations

import pytest
import torch

from sage_ray.config import LoraConfig, TrainConfig
from sage_ray.data import Example
from sage_ray.data.tokenize import tokenize_examples
from sage_ray.train.loop import load_lora_model, load_tokenizer, make_collator

pytest.importorskip("bitsandbytes")

MESSAGES = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_base_gets_gradients_and_learns(tiny_model_dir, bits):
    import bitsandbytes as bnb

    cfg = TrainConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, max_length=64, batch_size=2,
                      lora=LoraConfig(r=4, alpha=8), gradient_checkpointing=False)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_lora_model(str(tiny_model_dir), cfg, on_gpu=False)
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert any(isinstance(module, layer_type) for module in model.modules())

    items, _ = tokenize_examples(tokenizer, [Example(messages=MESSAGES)] * 2, max_length=64)
    batch = make_collator(tokenizer, cfg)([{"input_ids": i.input_ids, "labels": i.labels} for i in items])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    model.train()
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dpo_on_a_4bit_base_trains_the_adapter(tiny_model_dir, tmp_path):
    """QLoRA + DPO: TRL's trainer takes the quantized LoRA model as SFT does (no Ray: the trainer
    wiring only; tests/integration/test_preference_ray.py runs DPO on Ray Train)."""
    from pathlib import Path

    from transformers.trainer_callback import PrinterCallback

    from sage_ray.presets import apply_preset
    from sage_ray.train.callbacks import ProgressCallback
    from sage_ray.train.loop import training_kwargs
    from sage_ray.train.preference import preference_trainer, prepare_preference_data

    pairs = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart" / "preference.jsonl"
    cfg = apply_preset(TrainConfig(method="dpo", data=str(pairs), load_in_4bit=True, max_steps=3, batch_size=2,
                                   max_length=64, lr=1e-2, lora=LoraConfig(r=4, alpha=8)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    _dataset, rows, stats = prepare_preference_data(cfg)
    assert stats == {"records": 16, "rows": 16, "method": "dpo"}
    model = load_lora_model(str(tiny_model_dir), cfg, on_gpu=False)
    events = []
    trainer = preference_trainer(cfg, model, tokenizer, rows, training_kwargs(cfg, str(tmp_path), False),
                                 [ProgressCallback(events.append)])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    assert [e["step"] for e in events] == [1, 2, 3]
    assert all("rewards/accuracies" in e["metrics"] for e in events)
    lora_b = [p for name, p in model.named_parameters() if "lora_B.default" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the trained adapter moved off zero
