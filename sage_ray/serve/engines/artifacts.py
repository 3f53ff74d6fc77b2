"""Checks and helpers on the folders an engine serves, shared by the hf and vllm engines.

They run before an engine touches its model, so a broken folder fails fast with a clear
EngineError and the engine keeps serving what it served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sage_ray.artifacts import ADAPTER_CONFIG, MODEL_CONFIG, is_adapter, is_model
from sage_ray.serve.engines.base import EngineError, ModelSpec

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_model_folder(spec: ModelSpec) -> str:
    """The full model folder of `spec` (its base for a lora spec), which must hold config.json."""
    path = spec.full_model_path
    if not is_model(path):
        raise EngineError(f"cannot serve {spec.name!r}: {path} is not a model folder (no {MODEL_CONFIG}). "
                          "Point to a base model or a fine-tune's merged_model folder.")
    return path


def check_adapter_folder(spec: ModelSpec) -> None:
    """A LoRA folder needs its config and its weights."""
    folder = Path(spec.path)
    if not is_adapter(folder):
        raise EngineError(f"cannot load adapter {spec.name!r}: {folder} has no {ADAPTER_CONFIG}. "
                          "Point to a fine-tune's lora/ folder.")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise EngineError(f"cannot load adapter {spec.name!r}: {folder} has no adapter_model.safetensors. "
                          "The fine-tune may not have finished; check its status and logs.")


def adapter_config(path: str | Path) -> dict:
    """adapter_config.json as a dict, or EngineError saying what is wrong with it."""
    try:
        return json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise EngineError(f"cannot read {path}/{ADAPTER_CONFIG} ({error}); re-export the adapter") from error


def adapter_tokenizer(path: str | Path, base_tokenizer):
    """The adapter folder's tokenizer when its chat template or eos differ from the base's, else the base's.

    A fine-tune saves the tokenizer it trained with, and its template is the one the adapter
    learned. Reusing the base's when they match keeps adapter loads fast.
    """
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return base_tokenizer
    config = json.loads(config_file.read_text())
    template_file = path / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if (template is None or template == base_tokenizer.chat_template) and eos in (None, base_tokenizer.eos_token):
        return base_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def folder_stamp(path: str | Path) -> tuple:
    """What identifies a model folder's content cheaply: its real path and its files' sizes and times.

    A re-merge rewrites the same path; the stamp changes, so the engine reloads it.
    """
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return (str(path), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def check_adapter_weights(path: str, name: str) -> None:
    """The adapter's weights must open and match its config's rank: vLLM reads the ranks from the
    tensors and would serve a mismatched folder that peft refuses."""
    from safetensors import safe_open

    config, weights = adapter_config(path), os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights) or config.get("rank_pattern"):
        return  # a .bin adapter, or ranks per module: vLLM checks those itself
    try:
        with safe_open(weights, "pt") as tensors:
            ranks = {tensors.get_slice(key).get_shape()[0] for key in tensors.keys() if "lora_A" in key}
    except Exception as error:
        raise EngineError(f"cannot load adapter {name!r}: {weights} is not a readable safetensors file "
                          f"({error}); re-export the adapter") from error
    if ranks != {int(config.get("r", 0))}:
        raise EngineError(f"cannot load adapter {name!r}: its weights have rank {sorted(ranks)} but "
                          f"adapter_config.json says r={config.get('r')}; re-export the adapter")
