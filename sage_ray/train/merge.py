"""Merge a LoRA adapter into its base: a plain transformers model that vLLM can load too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def merge_adapter(lora_dir: str | Path, base_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write base + adapter as one model in `out_dir` (atomically: a crash leaves no half model).

    The base is loaded unquantized even when training used 4/8-bit, as merging into
    quantized weights loses precision; the tokenizer (with the chat template used in
    training) comes from the adapter folder.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    lora_dir, out_dir = Path(lora_dir), Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or _saved_dtype(base_dir))
    merged = PeftModel.from_pretrained(base, lora_dir).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(lora_dir).save_pretrained(tmp)
    try:
        GenerationConfig.from_pretrained(base_dir).save_pretrained(tmp)
    except OSError:
        pass  # a base without generation_config.json: transformers derives one from config.json
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _saved_dtype(model_dir: str | Path) -> torch.dtype:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)
