"""sage-ray: LoRA / QLoRA fine-tuning and hot-swap serving of LLMs on Ray.

    from sage_ray import TrainConfig, LoraConfig, presets, finetune
    cfg = presets.rtx_3060(); cfg.model = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    cfg.data = "./my_data.json"; finetune(cfg)
"""

from __future__ import annotations

from sage_ray import presets
from sage_ray.config import LoraConfig, TrainConfig

__version__ = "0.1.0"
__all__ = ["LoraConfig", "TrainConfig", "finetune", "presets"]


def finetune(cfg: TrainConfig, *, address: str | None = None):
    """Run one fine-tune on Ray Train and return its FinetuneResult (see sage_ray.train)."""
    from sage_ray.train.trainer import finetune as _finetune

    return _finetune(cfg, address=address)
