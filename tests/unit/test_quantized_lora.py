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
