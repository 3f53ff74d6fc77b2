"""Torch helpers of the transformers engine: dtype and padding choice, freeing device memory."""

from __future__ import annotations

import gc

import torch

from sage_ray.serve.engines.base import EngineError


def pick_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    if dtype:
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise EngineError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32  # half precision on CPU is slow and lossy
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pad_id(tokenizer, model) -> int:
    """The padding token of a batch: the tokenizer's, else the model's, else end-of-text."""
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0
