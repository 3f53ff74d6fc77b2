"""Training throughput, from one run: sage-ray on Ray Train vs plain transformers + peft, and
padding-free packing vs batches padded to max_length.

    python benchmarks/train_throughput.py [--model demo] [--steps 10] [--max-length 256]

All runs use the same model, dataset (the shipped chat conversations, varied lengths),
batch size, steps, learning rate and CPU threads. tokens/s counts real (non-pad) tokens and
is measured from the end of the first step (steady state); start-up (cluster, workers,
model load) is reported separately. Targets: Ray Train >= 0.9x the baseline; packing >= 1.5x
padded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sage_ray import TrainConfig, finetune
from sage_ray.models import resolve_model
from sage_ray.presets import apply_preset
from sage_ray.train.callbacks import ProgressCallback
from sage_ray.train.device import local_device
from sage_ray.data.tokenize import load_tokenizer
from sage_ray.train.loop import load_lora_model, make_collator, prepare_data, training_kwargs
from sage_ray.train.trainer import WORKER_ENV

DATA = Path(__file__).resolve().parents[1] / "sage_ray" / "quickstart" / "chat.json"


def baseline_process(cfg: TrainConfig, model_dir: Path) -> dict:
    """The baseline in a child process started with the glibc malloc settings the Ray Train
    workers get (WORKER_ENV): glibc reads them at process start, so setting them here would
    change nothing, and without them the comparison would measure the allocator, not Ray."""
    command = [sys.executable, __file__, "--baseline-of", cfg.model_dump_json(), str(model_dir)]
    done = subprocess.run(command, env={**os.environ, **WORKER_ENV}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline(cfg: TrainConfig, model_dir: Path) -> dict:
    """Plain transformers Trainer + peft in this process: no Ray at all."""
    from transformers import Trainer, TrainingArguments

    started = time.perf_counter()
    tokenizer = load_tokenizer(str(model_dir))
    _dataset, items, _val, _stats = prepare_data(cfg, tokenizer)
    model = load_lora_model(str(model_dir), cfg, on_gpu=False)
    progress = ProgressCallback(lambda event: None)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**training_kwargs(cfg.model_copy(update={"save_steps": 10_000}), out, on_gpu=False))
        trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=make_collator(tokenizer, cfg),
                          processing_class=tokenizer, callbacks=[progress])
        startup = time.perf_counter() - started
        trainer.train()
    return {"startup_s": startup, "tokens_per_s": progress.steady_tokens_per_s}


def runs_stats(cfg: TrainConfig, model_dir: Path) -> str:
    _dataset, _items, _val, stats = prepare_data(cfg, load_tokenizer(str(model_dir)))
    info = stats  # a dict of the tokenised training records
    return f"{info['records']} records, {info['mean_tokens']} tokens on average, {info['max_tokens']} at most"


def ray_train(cfg: TrainConfig, name: str) -> dict:
    """The product's path: finetune() on a Ray Train TorchTrainer with one worker."""
    started = time.perf_counter()
    result = finetune(cfg.model_copy(update={"name": name}))
    wall = time.perf_counter() - started
    metrics = result.meta["metrics"]
    return {"startup_s": wall - metrics["train_seconds"], "tokens_per_s": metrics["steady_tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None, help="default: the cpu preset's (512)")
    parser.add_argument("--baseline-of", nargs=2, metavar=("CONFIG_JSON", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_of:  # the child process of baseline_process
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(baseline(TrainConfig.model_validate_json(args.baseline_of[0]), Path(args.baseline_of[1]))))
        return

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    model_dir = resolve_model(args.model)  # from the usual $SAGE_HOME: the demo converts once
    os.environ["SAGE_HOME"] = tempfile.mkdtemp(prefix="sage-bench-")  # the runs' tasks stay out of it
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cfg = TrainConfig(model=str(model_dir), data=str(DATA), max_steps=args.steps, batch_size=args.batch_size,
                      max_length=args.max_length, lr=1e-4, save_steps=10_000, cpus_per_worker=threads, use_gpu=False,
                      validation_split=0.0)  # throughput of training alone: no held-out evaluation
    resolved = apply_preset(cfg, local_device(False))

    import ray

    # Every run, the baseline included, sees the same machine: a local Ray cluster idling beside it.
    ray.init(num_cpus=threads, log_to_driver=False)
    runs = {"baseline (transformers + peft, packed)": baseline_process(resolved, model_dir)}
    print(f"model {args.model}, {args.steps} steps, batch {resolved.batch_size}, max_length {resolved.max_length}, "
          f"{threads} CPU threads, dataset {DATA.name}: {runs_stats(resolved, model_dir)}", flush=True)
    runs["sage-ray on Ray Train (packed)"] = ray_train(cfg, "bench-packed")
    runs["sage-ray on Ray Train (padded to max_length)"] = ray_train(cfg.model_copy(update={"packing": False}),
                                                                     "bench-padded")
    ray.shutdown()

    print(f"\n{'run':<48} {'startup s':>10} {'tokens/s':>10}")
    for label, run in runs.items():
        print(f"{label:<48} {run['startup_s']:>10.1f} {run['tokens_per_s']:>10.1f}")
    base, packed, padded = (run["tokens_per_s"] for run in runs.values())
    print(f"\nRay Train / baseline tokens/s: {packed / base:.2f}x (target >= 0.9x)")
    print(f"packed / padded tokens/s:      {packed / padded:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
