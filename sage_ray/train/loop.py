"""The per-worker training procedure that Ray Train runs on every worker.

It reads top to bottom: tokenise the dataset with the model's chat template, load the base
(quantized where the config says), wrap it with LoRA, train with the transformers Trainer (SFT)
or TRL's DPO / ORPO / KTO trainer (train/preference.py),
and on the first worker save the adapter, the tokenizer and the run's figures.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset

from sage_ray.config import TrainConfig
from sage_ray.data import load_dataset
from sage_ray.data.split import split_records
from sage_ray.data.tokenize import IGNORE_INDEX, load_tokenizer, tokenize_examples
from sage_ray.paths import TaskPaths
from sage_ray.train.callbacks import CHECKPOINT_SUBDIR, KeepBest, LogSink, ProgressCallback, RayCheckpointCallback
from sage_ray.train.evaluation import argmax_logits, eval_kwargs, final_eval, token_accuracy
from sage_ray.train.preference import preference_trainer, prepare_preference_data
from sage_ray.train.publish import local_dataset, publish_run
from sage_ray.train.tracking import FanOut, RegistrySink, TaskLog


class _ListDataset(TorchDataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def load_lora_model(model_dir: str, cfg: TrainConfig, on_gpu: bool):
    """The base model (bitsandbytes 4/8-bit where asked) wrapped with a fresh LoRA adapter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.load_in_4bit or cfg.load_in_8bit:
        kwargs["quantization_config"] = bnb_config(cfg, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device() if on_gpu else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if cfg.load_in_4bit or cfg.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing))
    lora = PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def bnb_config(cfg: TrainConfig, compute_dtype: torch.dtype):
    from sage_ray.utils import require

    require("bitsandbytes", "4-bit and 8-bit loading", extra=None)
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def make_collator(tokenizer, cfg: TrainConfig):
    """Padding-free flattening when packing, else every batch padded to max_length."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if cfg.packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=cfg.max_length,
                                  label_pad_token_id=IGNORE_INDEX)


def training_kwargs(cfg: TrainConfig, output_dir: str, on_gpu: bool) -> dict[str, Any]:
    """The TrainingArguments of every method (TRL's configs extend them)."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        bf16=bool(cfg.bf16),
        fp16=bool(cfg.fp16),
        activation_checkpointing=bool(cfg.gradient_checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not on_gpu,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=on_gpu,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
    )


def prepare_data(cfg: TrainConfig, tokenizer):
    """Load, split, tokenise and describe the dataset (each worker does this; it is cheap):
    (dataset, train items, validation items, stats)."""
    dataset = load_dataset(local_dataset(cfg.data))
    train, held_out = split_records(dataset.examples, cfg.validation_split or 0.0, cfg.seed)
    if cfg.val_data:
        held_out = load_dataset(local_dataset(cfg.val_data)).examples
    items, stats = tokenize_examples(tokenizer, train, max_length=cfg.max_length,
                                     train_on_prompt=cfg.train_on_prompt)
    if not items:
        raise ValueError(f"{cfg.data}: no example has an assistant token left after truncation to "
                         f"max_length={cfg.max_length}; raise max_length")
    val_items, _ = tokenize_examples(tokenizer, held_out, max_length=cfg.max_length,
                                     train_on_prompt=cfg.train_on_prompt)
    stats = {**stats.as_dict(), "validation_records": len(val_items)}
    as_rows = lambda tokenized: [{"input_ids": i.input_ids, "labels": i.labels} for i in tokenized]  # noqa: E731
    return dataset, as_rows(items), as_rows(val_items), stats


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: `loop_config` = {config, model_dir, task_dir, sage_home}."""
    import ray.train
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    cfg = TrainConfig.model_validate(loop_config["config"])
    paths = TaskPaths(cfg.name, root=Path(loop_config["task_dir"]).parent)
    context = ray.train.get_context()
    rank0 = context.get_world_rank() == 0
    on_gpu = torch.cuda.is_available() and bool(cfg.use_gpu)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    # only the first worker writes the log (TaskLog: the file, or the head's copy from another node)
    log = TaskLog.for_worker(paths, loop_config["sage_home"]) if rank0 else TaskLog(paths)
    tokenizer = load_tokenizer(loop_config["model_dir"])
    val_items: list[dict] = []
    if cfg.method == "sft":
        dataset, items, val_items, stats = prepare_data(cfg, tokenizer)
    else:
        dataset, items, stats = prepare_preference_data(cfg)
    if rank0:
        log(f"dataset {dataset.path}: {dataset.format}, " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    model = load_lora_model(loop_config["model_dir"], cfg, on_gpu)

    progress, callbacks = make_callbacks(cfg.name, paths, rank0, loop_config["sage_home"], log)
    keeper = KeepBest(model) if cfg.keep == "best" and val_items else None
    if keeper is not None:
        callbacks.append(keeper)
    with tempfile.TemporaryDirectory(prefix=f"sage-{cfg.name}-") as output_dir:
        if cfg.method == "sft":
            args = training_kwargs(cfg, output_dir, on_gpu)
            if val_items:
                args.update(eval_kwargs(cfg.eval_steps, cfg.batch_size))
            trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=_ListDataset(items),
                              eval_dataset=_ListDataset(val_items) if val_items else None,
                              data_collator=make_collator(tokenizer, cfg), processing_class=tokenizer,
                              callbacks=callbacks, compute_metrics=token_accuracy if val_items else None,
                              preprocess_logits_for_metrics=argmax_logits if val_items else None)
        else:
            trainer = preference_trainer(cfg, model, tokenizer, items, training_kwargs(cfg, output_dir, on_gpu),
                                         callbacks, log if rank0 else None)
        trainer.remove_callback(PrinterCallback)
        resume = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume = os.path.join(checkpoint.to_directory(), CHECKPOINT_SUBDIR)
            if rank0:
                log(f"resuming from {resume}")
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume)
        elapsed = time.perf_counter() - started
        if val_items and not progress.evaluated_at(trainer.state.global_step):
            trainer.evaluate()  # the final figures, unless the last step was an eval step already
        kept = keeper.restore() if keeper is not None else None

    if rank0:
        # only the trained adapter: DPO/KTO add a frozen "ref" copy that serving must not load
        model.save_pretrained(paths.lora, selected_adapters=["default"])
        tokenizer.save_pretrained(paths.lora)
        result = run_figures(trainer, output, progress, elapsed)
        result.update(dataset={**dataset.summary(), **stats}, workers=context.get_world_size(),
                      device="cuda" if on_gpu else "cpu", method=cfg.method, kept=kept)
        if kept is not None:
            last = trainer.state.global_step
            log(f"keep best: the adapter of step {kept['step']} (eval loss {kept['eval_loss']}) is exported"
                + (" (the last step's)" if kept["step"] == last else f", not the last step's ({last})"))
        result = publish_run(paths, result)  # with SAGE_STORAGE: the adapter and these figures, for other nodes
        paths.result.write_text(json.dumps(result, indent=2))
    log.flush()


def make_callbacks(task_id: str, paths: TaskPaths, rank0: bool, sage_home: str, log: TaskLog):
    """Progress (log, and registry from the first worker), checkpoints to Ray, TensorBoard."""
    from transformers.integrations import TensorBoardCallback

    sink = LogSink(log)
    if rank0:
        sink = FanOut(sink, RegistrySink(task_id, sage_home))
    progress = ProgressCallback(sink)
    callbacks = [progress, RayCheckpointCallback()]
    if rank0:
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(paths.logs))))
    return progress, callbacks


def run_figures(trainer, output, progress: ProgressCallback, elapsed: float) -> dict[str, Any]:
    """What train_result.json (and so finetune_meta.json's metrics) records of the run."""
    tokens = trainer.state.num_input_tokens_seen
    return {
        "train_loss": output.training_loss,
        "final_loss": progress.loss_history[-1][1] if progress.loss_history else None,
        "loss_history": progress.loss_history,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": round(elapsed, 2),
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "steady_tokens_per_s": progress.steady_tokens_per_s,
        **({"final_metrics": progress.last_metrics} if progress.last_metrics else {}),
        **({"eval_history": progress.eval_history, **final_eval(progress.eval_history)}
           if progress.eval_history else {}),
    }
