"""GPU-memory presets, `auto` selection, and a memory estimate from the model's config.json.

A preset fills only the fields a user left unset (None); anything given explicitly wins.
`presets.rtx_3060()` and friends return a TrainConfig to edit and pass to `finetune()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_ray.config import LoraConfig, TrainConfig
from sage_ray.errors import SageError

GiB = 1024**3

# The table of MISSION.md, per GPU of a worker. Order: smallest to largest device.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(load_in_4bit=False, load_in_8bit=False, bf16=False, fp16=False, max_length=512,
                batch_size=4, grad_accum=1, gradient_checkpointing=False, optimizer="adamw_torch",
                lora=dict(r=8, alpha=16)),
    "minimal": dict(load_in_4bit=True, load_in_8bit=False, bf16=False, fp16=True, max_length=512,
                    batch_size=1, grad_accum=32, gradient_checkpointing=True,
                    optimizer="paged_adamw_8bit", lora=dict(r=4, alpha=8)),
    "rtx_3060": dict(load_in_4bit=False, load_in_8bit=True, bf16=True, fp16=False, max_length=1024,
                     batch_size=1, grad_accum=16, gradient_checkpointing=True,
                     optimizer="paged_adamw_8bit", lora=dict(r=8, alpha=16)),
    "rtx_4090": dict(load_in_4bit=False, load_in_8bit=False, bf16=True, fp16=False, max_length=2048,
                     batch_size=4, grad_accum=4, gradient_checkpointing=False,
                     optimizer="adamw_torch", lora=dict(r=8, alpha=16)),
    "a100": dict(load_in_4bit=False, load_in_8bit=False, bf16=True, fp16=False, max_length=4096,
                 batch_size=8, grad_accum=2, gradient_checkpointing=False,
                 optimizer="adamw_torch", lora=dict(r=16, alpha=32)),
    "h100": dict(load_in_4bit=False, load_in_8bit=False, bf16=True, fp16=False, max_length=4096,
                 batch_size=16, grad_accum=1, gradient_checkpointing=False,
                 optimizer="adamw_torch_fused", lora=dict(r=16, alpha=32)),
}
GPU_PRESETS = ("minimal", "rtx_3060", "rtx_4090", "a100", "h100")
# Free GPU memory (GiB) from which `auto` picks each preset.
_AUTO_THRESHOLDS = (("h100", 70), ("a100", 36), ("rtx_4090", 20), ("rtx_3060", 10), ("minimal", 0))


@dataclass(frozen=True)
class DeviceInfo:
    """What one training worker will run on."""

    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool = False

    def describe(self) -> str:
        return f"{self.name} ({self.free_bytes / GiB:.1f} GiB free of {self.total_bytes / GiB:.1f} GiB)"


def select_auto(device: DeviceInfo) -> str:
    """The preset `auto` resolves to on this device."""
    if device.kind != "cuda":
        return "cpu"
    free_gib = device.free_bytes / GiB
    return next(name for name, floor in _AUTO_THRESHOLDS if free_gib >= floor)


def apply_preset(cfg: TrainConfig, device: DeviceInfo | None = None) -> TrainConfig:
    """A copy of `cfg` with every unset field taken from its preset (auto resolved on `device`)."""
    name = cfg.preset
    if name == "auto":
        name = select_auto(device) if device else "cpu"
    values = dict(PRESETS[name])
    lora_values = values.pop("lora")
    update = {key: value for key, value in values.items() if getattr(cfg, key) is None}
    if device is not None and device.kind == "cpu":
        # A GPU preset asked for on a CPU: fp16 mixed precision and paged optimizers need CUDA.
        if cfg.fp16 is None:
            update["fp16"] = False
        if cfg.optimizer is None and "paged" in update.get("optimizer", ""):
            update["optimizer"] = "adamw_torch"
    if device is not None and device.kind == "cuda" and update.get("bf16") and not device.bf16:
        update["bf16"], update["fp16"] = False, True
    if cfg.method == "kto" and update.get("batch_size", 2) < 2:
        # KTO's KL estimate needs a second example in the batch; keep the effective batch size
        update["batch_size"] = 2
        if "grad_accum" in update:
            update["grad_accum"] = max(1, update["grad_accum"] // 2)
    lora = cfg.lora.model_copy(
        update={key: value for key, value in lora_values.items() if getattr(cfg.lora, key) is None}
    )
    return cfg.model_copy(update={**update, "preset": name, "lora": lora})


def _preset_config(name: str) -> TrainConfig:
    values = dict(PRESETS[name])
    return TrainConfig(preset=name, lora=LoraConfig(**values.pop("lora")), **values)


def cpu() -> TrainConfig:
    """fp32, no quantization, short sequences: for laptops and CI."""
    return _preset_config("cpu")


def minimal() -> TrainConfig:
    """Under 8 GB of GPU memory: 4-bit QLoRA, gradient checkpointing, r=4."""
    return _preset_config("minimal")


def rtx_3060() -> TrainConfig:
    """12 GB: 8-bit base, gradient checkpointing, r=8."""
    return _preset_config("rtx_3060")


def rtx_4090() -> TrainConfig:
    """24 GB: 16-bit base, batch 4, r=8."""
    return _preset_config("rtx_4090")


def a100() -> TrainConfig:
    """40 GB or more: bf16, 4096 tokens, batch 8, r=16."""
    return _preset_config("a100")


def h100() -> TrainConfig:
    """80 GB: bf16, batch 16, fused AdamW, r=16."""
    return _preset_config("h100")


# ---------------------------------------------------------------- memory estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker needs, by part."""

    weights: int
    trainable: int
    activations: int
    logits: int
    overhead: int
    params: int
    lora_params: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        parts = ", ".join(
            f"{label} {value / GiB:.2f}"
            for label, value in (("weights", self.weights), ("LoRA+optimizer", self.trainable),
                                 ("activations", self.activations), ("logits", self.logits),
                                 ("overhead", self.overhead))
        )
        return f"{self.total / GiB:.2f} GiB ({parts} GiB; {self.params / 1e6:.1f}M params, {self.lora_params / 1e6:.2f}M trainable)"


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model folder; the text part for multimodal configs."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("text_config", config)


def _linear_shapes(mc: dict[str, Any]) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder block."""
    hidden, inter = mc["hidden_size"], mc.get("intermediate_size", 4 * mc["hidden_size"])
    heads = mc["num_attention_heads"]
    head_dim = mc.get("head_dim") or hidden // heads
    kv = mc.get("num_key_value_heads") or heads
    q, kv_out = heads * head_dim, kv * head_dim
    return [(hidden, q), (hidden, kv_out), (hidden, kv_out), (q, hidden),
            (hidden, inter), (hidden, inter), (inter, hidden)]


def estimate_memory(model_config: dict[str, Any], cfg: TrainConfig, device_kind: str = "cuda") -> MemoryEstimate:
    """Estimate one worker's peak memory for `cfg` (already resolved by apply_preset).

    Weights by quantization, LoRA weights with gradients and AdamW states, activations
    (Korthikanti et al.: ~34 bytes x hidden per token and layer in 16-bit; only the layer
    inputs with gradient checkpointing), the fp32 logits and their gradient, and a fixed
    overhead for the CUDA context and allocator.
    """
    hidden, layers, vocab = model_config["hidden_size"], model_config["num_hidden_layers"], model_config["vocab_size"]
    shapes = _linear_shapes(model_config)
    linear = layers * sum(i * o for i, o in shapes)
    embed = vocab * hidden * (1 if model_config.get("tie_word_embeddings", False) else 2)
    params = linear + embed + (2 * layers + 1) * hidden
    half = cfg.bf16 or cfg.fp16 or cfg.load_in_4bit or cfg.load_in_8bit
    dense_bytes = 2 if half else 4
    per_linear = 0.55 if cfg.load_in_4bit else 1.0 if cfg.load_in_8bit else dense_bytes
    weights = int(linear * per_linear + (params - linear) * dense_bytes)

    r = cfg.lora.r or 8
    lora_params = layers * sum(r * (i + o) for i, o in shapes)
    optimizer_bytes = 2 if "8bit" in (cfg.optimizer or "") else 8
    trainable = lora_params * (4 + 4 + optimizer_bytes)

    tokens = (cfg.batch_size or 1) * (cfg.max_length or 512)
    act_scale = 1 if half else 2
    per_layer = (2 if cfg.gradient_checkpointing else 34) * hidden * tokens * act_scale
    activations = per_layer * layers + (34 * hidden * tokens * act_scale if cfg.gradient_checkpointing else 0)
    logits = tokens * vocab * 4 * 2
    overhead = int(1.0 * GiB) if device_kind == "cuda" else int(0.5 * GiB)
    return MemoryEstimate(weights, trainable, activations, logits, overhead, params, lora_params)


class DoesNotFitError(SageError, RuntimeError):
    """The estimate exceeds the worker's device; the message gives the estimate and what to try."""


def check_fits(model_config: dict[str, Any], cfg: TrainConfig, device: DeviceInfo) -> MemoryEstimate:
    """Refuse, before any loading, a config whose estimate exceeds the device's free memory."""
    estimate = estimate_memory(model_config, cfg, device.kind)
    if estimate.total <= device.free_bytes:
        return estimate
    advice = "use a smaller model, or lower max_length and batch_size"
    if device.kind == "cuda":
        for name in reversed(GPU_PRESETS):
            candidate = apply_preset(TrainConfig(preset=name, model=cfg.model), device)
            needed = estimate_memory(model_config, candidate).total
            if needed <= device.free_bytes:
                if name != cfg.preset:
                    advice = f"try --preset {name} (it needs {needed / GiB:.1f} GiB)"
                break
    raise DoesNotFitError(
        f"this fine-tune needs about {estimate.describe()} per worker, but {device.describe()} "
        f"has less. With preset '{cfg.preset}', {advice}."
    )
