"""Evaluation tied to serving, on the tiny model and a real local Ray cluster: eval loss per
eval step while training, a fine-tune compared with its base on held-out records, a gated
switch that refuses a worse model, and rollback."""

from __future__ import annotations

import json
import random

import pytest

from sage_ray import TrainConfig, finetune

_RUNS: dict = {}

# A learnable task: each topic has its own reply, asked in many ways; held-out records ask in
# other words. The tiny model's random lm_head caps what a LoRA on the blocks can change, so
# the test runs adapt lm_head too.
TOPICS = {"cat": "Cats are small animals that purr and sleep a lot.",
          "sea": "The sea is deep, salty and very blue.",
          "bread": "Bread is baked from flour, water and yeast.",
          "train": "A train runs on rails between stations.",
          "moon": "The moon circles the earth once a month."}
ASK = ["Tell me about the {}.", "What do you know about the {}?", "Describe the {} in one line.",
       "Say something about the {}.", "Give me a fact on the {}.", "Explain the {} briefly.",
       "I wonder about the {}.", "Write one sentence on the {}.", "What is a {}?", "Any thoughts on the {}?",
       "Talk about the {}.", "Share a line about the {}.", "Quick note on the {}, please.", "The {}: what is it?"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory):
    """(train file, validation file): 60 and 10 records of the topic task."""
    records = [{"instruction": ask.format(t), "output": reply} for t, reply in TOPICS.items() for ask in ASK]
    random.Random(0).shuffle(records)
    folder = tmp_path_factory.mktemp("topics")
    return write_jsonl(folder / "train.jsonl", records[10:]), write_jsonl(folder / "val.jsonl", records[:10])


def tune(name, model_dir, data, val_data, steps=24):
    if name not in _RUNS:
        cfg = TrainConfig(name=name, model=str(model_dir), data=str(data), val_data=str(val_data), max_steps=steps,
                          batch_size=4, lr=1e-2, max_length=128, eval_steps=6, save_steps=100, cpus_per_worker=1,
                          lora={"target_modules": TARGETS})
        _RUNS[name] = finetune(cfg)
    return _RUNS[name]


def test_eval_loss_is_recorded_per_eval_step_and_falls(ray_cluster, tiny_model_dir, topic_data):
    import ray

    from sage_ray.registry import get_registry

    train, val = topic_data
    result = tune("eval-learned", tiny_model_dir, train, val)
    job = ray.get(get_registry(ray_cluster.sage_home).get_job.remote("eval-learned"))
    evals = job["eval_history"]
    assert [step for step, _loss, _acc in evals] == [6, 12, 18, 24]
    losses = [loss for _step, loss, _acc in evals]
    assert losses[-1] < losses[0] * 0.9, losses  # it learns what the held-out records say
    assert all(0.0 <= acc <= 1.0 for _s, _l, acc in evals) and evals[-1][2] > evals[0][2], evals

    meta = json.loads(result.paths.meta.read_text())
    assert meta["eval_history"] == evals
    assert meta["metrics"]["eval_loss"] == losses[-1] and meta["metrics"]["best_eval_loss"] == min(losses)
    assert meta["dataset"]["validation_records"] == 10
    log = result.paths.train_log.read_text()
    assert f"validation set: the file {val}" in log and "eval at step 24: eval loss" in log
