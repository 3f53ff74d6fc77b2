"""Preference training (DPO, ORPO, KTO) with TRL's trainers, in the same Ray Train worker
loop as SFT: same LoRA / QLoRA model, presets, callbacks, checkpoints and resume.

Records keep their prompt and replies as chat messages; TRL renders them with the model's
own chat template (the one serving applies) and tokenises them itself. The LoRA model is
handed over already wrapped: DPO and KTO then take the reference from a frozen copy of the
fresh adapter (equal to the base, since LoRA starts at zero), ORPO needs no reference.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from sage_ray.config import DEFAULT_BETA, TrainConfig
from sage_ray.data import Dataset, load_dataset
from sage_ray.train.publish import local_dataset

# What TRL logs besides the loss and that the task's chart and log show, per method.
METRICS = {
    "dpo": ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"),
    "orpo": ("rewards/accuracies", "rewards/margins", "nll_loss", "log_odds_ratio"),
    "kto": ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"),
}
ALL_METRICS = tuple(dict.fromkeys(name for names in METRICS.values() for name in names))


def preference_rows(dataset: Dataset, method: str) -> list[dict[str, Any]]:
    """TRL's conversational rows: prompt/chosen/rejected, or prompt/completion/label for KTO
    (pairs become two labelled rows: chosen desirable, rejected undesirable)."""
    rows: list[dict[str, Any]] = []
    for example in dataset.examples:
        extra = {"tools": json.dumps(example.tools)} if example.tools else {}
        if method != "kto":
            rows.append({"prompt": example.messages, "chosen": example.chosen,
                         "rejected": example.rejected, **extra})
        elif example.label is not None:
            rows.append({"prompt": example.messages, "completion": example.completion,
                         "label": example.label, **extra})
        else:
            rows.append({"prompt": example.messages, "completion": example.chosen, "label": True, **extra})
            rows.append({"prompt": example.messages, "completion": example.rejected, "label": False, **extra})
    if any("tools" in row for row in rows):  # one column for all rows (Arrow needs a schema)
        rows = [{**row, "tools": row.get("tools")} for row in rows]
    return rows


def prepare_preference_data(cfg: TrainConfig):
    """The dataset, TRL's rows as a `datasets.Dataset`, and what the log and meta say of it."""
    from datasets import Dataset as HFDataset

    dataset = load_dataset(local_dataset(cfg.data), method=cfg.method)
    rows = preference_rows(dataset, cfg.method)
    stats = {"records": len(dataset), "rows": len(rows), "method": cfg.method}
    if cfg.method == "kto":
        stats["desirable"] = sum(bool(row["label"]) for row in rows)
        stats["undesirable"] = len(rows) - stats["desirable"]
    return dataset, HFDataset.from_list(rows), stats


def preference_trainer(cfg: TrainConfig, model, tokenizer, rows, args: dict[str, Any], callbacks: list,
                       log: Callable[[str], None] | None = None):
    """TRL's trainer for `cfg.method`, with the loop's training arguments; says how many rows TRL
    dropped (a prompt that alone fills max_length leaves no reply to learn) and refuses when all were."""
    trainer = _make_trainer(cfg, model, tokenizer, rows, args, callbacks)
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise ValueError(f"{cfg.data}: every prompt alone fills max_length={cfg.max_length} tokens, so no reply is "
                         "left to learn from; raise max_length")
    if kept < len(rows) and log is not None:
        log(f"{len(rows) - kept} of {len(rows)} rows dropped: their prompt alone fills max_length={cfg.max_length}")
    return trainer


def _make_trainer(cfg: TrainConfig, model, tokenizer, rows, args: dict[str, Any], callbacks: list):
    # TRL's configs default to bf16 and gradient checkpointing: the loop's explicit values win.
    args = {**args, "max_length": cfg.max_length, "beta": cfg.beta or DEFAULT_BETA,
            "gradient_checkpointing": args["activation_checkpointing"]}
    if cfg.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        # ORPO's batches hold chosen_/rejected_input_ids, which the Trainer's token count cannot read
        args["include_num_input_tokens_seen"] = "no"
        return ORPOTrainer(model=model, args=ORPOConfig(**args), train_dataset=rows,
                           processing_class=tokenizer, callbacks=callbacks)
    # remove_unused_columns drops the message columns once TRL has tokenised them
    args.update(remove_unused_columns=True)
    if cfg.method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer(model=model, args=KTOConfig(**args), train_dataset=rows,
                          processing_class=tokenizer, callbacks=callbacks)
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=model, args=DPOConfig(**args), train_dataset=rows,
                      processing_class=tokenizer, callbacks=callbacks)
