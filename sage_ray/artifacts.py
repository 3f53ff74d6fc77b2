"""What an artifact folder is, in one place: the file names that mark a full model and a LoRA
adapter, the folder names inside a task, and the checks built on them. Imports nothing heavy,
so the registry, the engines, the trainer and the CLI all share it."""

from __future__ import annotations

import json
import os
from pathlib import Path

MODEL_CONFIG = "config.json"  # a transformers model folder (base or merged)
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT LoRA adapter folder
META = "finetune_meta.json"  # written last: a task folder with one is complete
LORA_DIR = "lora"
MERGED_DIR = "merged_model"


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_model(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> str | None:
    """base_model_name_or_path from a LoRA folder's adapter_config.json (None when absent or unreadable)."""
    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return config.get("base_model_name_or_path") or None
