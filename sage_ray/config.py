"""Configuration models for fine-tuning, with YAML load/dump.

Every field has a description (it is the documentation and the CLI help); unknown keys are
refused; validators name the field and say how to fix it. A field left unset (None) is filled
by the preset, so values the user wrote always win over the preset's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sage_ray.errors import SageError

TaskType = Literal["code", "qa", "chat", "instruction", "custom"]
PresetName = Literal["auto", "cpu", "minimal", "rtx_3060", "rtx_4090", "a100", "h100"]
Method = Literal["sft", "dpo", "orpo", "kto"]
PREFERENCE_METHODS = ("dpo", "orpo", "kto")
DEFAULT_BETA = 0.1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    """LoRA adapter settings (peft)."""

    r: int | None = Field(None, description="LoRA rank; None takes the preset's.")
    alpha: int | None = Field(None, description="LoRA alpha (scaling = alpha / r); None takes the preset's.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules to adapt: a list of names or 'all-linear'."
    )

    @field_validator("r", "alpha")
    @classmethod
    def _positive(cls, value: int | None, info) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"lora.{info.field_name} must be a positive integer, got {value}; try 8")
        return value


class TrainConfig(_Strict):
    """One fine-tune: what to train, on what, and how."""

    name: str | None = Field(None, description="Task id; the output goes to $SAGE_HOME/studio_finetune/<name>/. Generated when empty.")
    task: TaskType = Field("custom", description="Kind of task (code, qa, chat, instruction, custom); informational.")
    model: str = Field("demo", description="Base model: a local folder, a hub id, 'demo' (SmolLM2-135M-Instruct) or 'tiny'.")
    data: str | None = Field(None, description="Dataset file (JSON array or JSONL) in a supported format.")
    val_data: str | None = Field(None, description="Validation file (same formats as data), evaluated every eval_steps; sft only.")
    validation_split: float | None = Field(None, ge=0, lt=1, description="Fraction of data held out for evaluation; None: 10% (at most 200 records) of datasets of 50 records or more, else 0; sft only.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate on the validation set every N optimizer steps and at the end; None: about 10 times per run.")
    keep: Literal["last", "best"] = Field("last", description="The adapter exported: the last step's, or the one of the evaluation with the lowest eval loss (needs a validation set).")
    method: Method = Field("sft", description="Training method: sft (supervised replies), dpo or orpo (chosen/rejected pairs), kto (replies labelled true/false, or pairs).")
    beta: float | None = Field(None, gt=0, description="dpo/orpo/kto only: how strongly the preferences pull away from the base (TRL's beta); None: 0.1.")
    preset: PresetName = Field("auto", description="Memory preset; 'auto' picks by the worker's free GPU memory, else 'cpu'.")
    epochs: float = Field(1.0, gt=0, description="Training epochs (fractions allowed).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int | None = Field(None, gt=0, description="Per-worker micro-batch size; None takes the preset's.")
    grad_accum: int | None = Field(None, gt=0, description="Gradient accumulation steps; None takes the preset's.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: str = Field("cosine", description="transformers learning-rate schedule name.")
    max_length: int | None = Field(None, gt=8, description="Maximum tokens per example; longer ones are truncated. None takes the preset's.")
    load_in_4bit: bool | None = Field(None, description="QLoRA: load the base in 4-bit NF4 (bitsandbytes). None takes the preset's.")
    load_in_8bit: bool | None = Field(None, description="Load the base in 8-bit (bitsandbytes). None takes the preset's.")
    bf16: bool | None = Field(None, description="Train in bfloat16 mixed precision. None takes the preset's.")
    fp16: bool | None = Field(None, description="Train in float16 mixed precision. None takes the preset's.")
    gradient_checkpointing: bool | None = Field(None, description="Recompute activations to save memory. None takes the preset's.")
    optimizer: str | None = Field(None, description="transformers optimizer name (adamw_torch, paged_adamw_8bit, ...). None takes the preset's.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings.")
    packing: bool = Field(True, description="Padding-free batching: a batch's examples are concatenated without pad tokens (sft; preference methods pad each pair).")
    train_on_prompt: bool = Field(False, description="Also compute the loss on system/user tokens (default: assistant tokens only).")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data parallel).")
    use_gpu: bool | None = Field(None, description="Train on GPUs; None uses them when the cluster has any.")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs reserved per training worker; None: 1 with GPUs, else the cluster's CPUs shared among the workers.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps (used by resume).")
    logging_steps: int = Field(1, gt=0, description="Log loss and progress every N optimizer steps.")
    merge: bool = Field(False, description="After training, merge the adapter into a full model in merged_model/.")
    seed: int = Field(42, description="Random seed for data order and LoRA init.")

    @model_validator(mode="after")
    def _exclusive_choices(self) -> TrainConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(
                "load_in_4bit and load_in_8bit are both true: pick one quantization "
                "(4-bit for the least memory, 8-bit for more accuracy), or neither"
            )
        if self.bf16 and self.fp16:
            raise ValueError(
                "bf16 and fp16 are both true: pick one precision (bf16 on Ampere GPUs or newer, fp16 on older ones)"
            )
        if self.val_data and self.validation_split:
            raise ValueError(f"val_data and validation_split={self.validation_split} both pick a validation set: "
                             "give one (a file, or a fraction of data held out)")
        asked = [f for f in ("val_data", "validation_split") if getattr(self, f)] + (["keep"] if self.keep == "best" else [])
        if self.method != "sft" and asked:
            raise ValueError(f"evaluation ({', '.join(asked)}) is for method sft only; {self.method} runs "
                             f"train without a validation set: remove {' / '.join(asked)}")
        return self

    # Checks against `method` (declared before these fields, so info.data has it): the error then
    # names the field the user should change.
    @field_validator("beta")
    @classmethod
    def _beta_needs_a_preference_method(cls, value: float | None, info) -> float | None:
        method = info.data.get("method", "sft")
        if value is not None and method not in PREFERENCE_METHODS:
            raise ValueError(f"beta applies to the preference methods {PREFERENCE_METHODS} only, and method is "
                             f"{method!r}: set method to dpo, orpo or kto, or remove beta")
        return value

    @field_validator("batch_size")
    @classmethod
    def _kto_batch(cls, value: int | None, info) -> int | None:
        if info.data.get("method") == "kto" and value == 1:
            raise ValueError("batch_size must be at least 2 for method kto: its KL estimate pairs each reply with "
                             "another prompt of the same batch; set batch_size to 2 or more")
        return value

    @field_validator("train_on_prompt")
    @classmethod
    def _prompt_tokens_are_sft_only(cls, value: bool, info) -> bool:
        method = info.data.get("method", "sft")
        if value and method != "sft":
            raise ValueError(f"train_on_prompt applies to method sft only; {method} learns from the replies "
                             "it compares: remove train_on_prompt")
        return value

    @property
    def quantization(self) -> str:
        """'4bit', '8bit' or 'none', as the presets table says it."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else "none"


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """One line per problem: where (file and dotted field) and what to do."""
    where = f"{source}: " if source else ""
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(config)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `sage finetune start --help`"
        lines.append(f"{where}field '{field}': {msg}")
    return "\n".join(lines)


class ConfigError(SageError, ValueError):
    """A config file or value that cannot be used; the message says where and how to fix it."""


def parse_train_config(values: dict[str, Any], source: str | None = None) -> TrainConfig:
    """Validate a mapping, turning pydantic's error into a message that names file and field."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a fine-tune YAML file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {type(values).__name__}")
    return parse_train_config(values, source=str(path))


def dump_train_config(cfg: TrainConfig, path: str | Path | None = None, *, header: str | None = None) -> str:
    """YAML of the fields set (explicitly or by a preset); written to `path` when given."""
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
