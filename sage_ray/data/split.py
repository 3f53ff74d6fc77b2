"""The validation set of a fine-tune: a held-out fraction of its dataset, or a file of its own.

The split is a pure function of (records, fraction, seed), so the training workers, the
driver and a later `sage finetune compare` all hold out exactly the same records.
"""

from __future__ import annotations

import random
from typing import TypeVar

from sage_ray.config import ConfigError, TrainConfig

T = TypeVar("T")

AUTO_FRACTION = 0.1
AUTO_MIN_RECORDS = 50  # below this, holding out a tenth leaves too few to train on or to judge by
AUTO_MAX_HELD_OUT = 200  # past this, more held-out records only make each evaluation slower


def auto_fraction(records: int) -> float:
    """What validation_split None means for a dataset of `records` records."""
    if records < AUTO_MIN_RECORDS:
        return 0.0
    return round(min(AUTO_FRACTION, AUTO_MAX_HELD_OUT / records), 4)


def held_out_count(records: int, fraction: float) -> int:
    """How many records `fraction` holds out: at least one when it is not 0, never all."""
    if fraction <= 0:
        return 0
    return min(records - 1, max(1, round(records * fraction)))


def split_records(records: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation): `fraction` of `records` picked at random by `seed`; both keep file order."""
    count = held_out_count(len(records), fraction)
    picked = set(random.Random(seed).sample(range(len(records)), count)) if count else set()
    train = [r for i, r in enumerate(records) if i not in picked]
    return train, [r for i, r in enumerate(records) if i in picked]


def resolve_validation(cfg: TrainConfig, records: int) -> tuple[TrainConfig, str]:
    """The config with validation_split decided (auto -> a number), and the sentence for the log.

    An explicit eval_steps or keep 'best' with no validation set is refused: it would be silently ignored."""
    if cfg.num_workers > 1:  # each worker would evaluate a shard and wait on the others: not implemented
        if cfg.val_data or cfg.validation_split or cfg.eval_steps is not None or cfg.keep == "best":
            field = ("val_data" if cfg.val_data else "validation_split" if cfg.validation_split
                     else "eval_steps" if cfg.eval_steps is not None else "keep")
            raise ConfigError(f"field '{field}': evaluation with num_workers {cfg.num_workers} is not implemented; "
                              "train with one worker for eval loss, or remove it")
        return cfg.model_copy(update={"validation_split": 0.0}), "validation set: none (evaluation runs with one worker)"
    if cfg.val_data:
        return cfg.model_copy(update={"validation_split": 0.0}), f"validation set: the file {cfg.val_data}"
    fraction = cfg.validation_split
    how = "given"
    if fraction is None:
        fraction = auto_fraction(records) if cfg.method == "sft" else 0.0
        how = (f"automatic: 10% of datasets of {AUTO_MIN_RECORDS}+ records" if cfg.method == "sft"
               else f"method {cfg.method} trains without one")
    held = held_out_count(records, fraction)
    for field, asked in (("eval_steps", cfg.eval_steps is not None), ("keep", cfg.keep == "best")):
        if held == 0 and asked:
            raise ConfigError(f"field '{field}': there is no validation set to evaluate ({records} records, "
                              f"validation_split 0): give val_data or a validation_split, or remove {field}")
    cfg = cfg.model_copy(update={"validation_split": fraction})
    if held == 0:
        return cfg, f"validation set: none ({how}; {records} records); set validation_split or val_data for eval loss"
    return cfg, f"validation set: {held} of {records} records held out (validation_split {fraction}, {how})"
