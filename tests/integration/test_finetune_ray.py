"""Fine-tune the tiny model through Ray Train on a real local cluster, 1 and 2 CPU workers."""

from __future__ import annotations

import json

import pytest
import torch

from sage_ray import TrainConfig, finetune


_RESULTS: dict = {}


def train_tiny(workers: int, model_dir, data):
    """One fine-tune per worker count, shared by the tests of this module."""
    if workers not in _RESULTS:
        cfg = TrainConfig(name=f"tiny-{workers}w", model=str(model_dir), data=str(data), max_steps=10,
                          batch_size=4, lr=5e-3, max_length=256, save_steps=5, merge=True, num_workers=workers,
                          cpus_per_worker=1)
        _RESULTS[workers] = finetune(cfg)
    return _RESULTS[workers]


@pytest.mark.parametrize("workers", [1, 2])
def test_finetune_tiny_lora_and_merge(ray_cluster, tiny_model_dir, chat_data, workers):
    result = train_tiny(workers, tiny_model_dir, chat_data)
    task = ray_cluster.sage_home / "studio_finetune" / f"tiny-{workers}w"
    assert result.paths.dir == task

    losses = [loss for _step, loss in result.meta["loss_history"]]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (task / "lora" / name).exists(), name
    assert (task / "merged_model" / "config.json").exists()
    assert list((task / "logs").glob("events.out.tfevents*")), "no TensorBoard event file"
    assert list((task / "checkpoints").glob("checkpoint_*/checkpoint/trainer_state.json"))
    assert "step 10/10" in (task / "train.log").read_text()

    meta = json.loads((task / "finetune_meta.json").read_text())
    assert meta["task_id"] == f"tiny-{workers}w" and meta["type"] == "merged" and meta["status"] == "completed"
    assert meta["base_model_path"] == str(tiny_model_dir)
    held_out = 5 if workers == 1 else 0  # 10% held out automatically; evaluation runs with one worker
    assert meta["dataset"]["records"] == 53 - held_out and len(meta["dataset"]["sha256"]) == 64
    assert meta["dataset"]["format"] == "conversations"
    assert meta["dataset"]["validation_records"] == held_out and bool(meta["eval_history"]) == (workers == 1)
    assert meta["metrics"]["workers"] == workers and meta["metrics"]["steps"] == 10
    assert meta["config"]["preset"] == "cpu" and meta["config"]["batch_size"] == 4


def test_merged_model_matches_adapter_on_base(ray_cluster, tiny_model_dir, chat_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = train_tiny(1, tiny_model_dir, chat_data).paths.dir
    tokenizer = AutoTokenizer.from_pretrained(task / "merged_model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    merged = AutoModelForCausalLM.from_pretrained(task / "merged_model").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), task / "lora").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        merged_logits = merged(**ids).logits
        adapted_logits = adapted(**ids).logits
        base_logits = base(**ids).logits
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter changed something
    generated = merged.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_registry_has_the_job_and_its_artifacts(ray_cluster, tiny_model_dir, chat_data):
    import ray

    from sage_ray.registry import get_registry

    train_tiny(1, tiny_model_dir, chat_data)
    registry = get_registry(ray_cluster.sage_home)
    job = ray.get(registry.get_job.remote("tiny-1w"))
    assert job["status"] == "completed" and job["progress"] == 100.0 and job["error"] is None
    steps = [step for step, _loss in job["loss_history"]]
    assert steps == list(range(1, 11))
    artifacts = {a["name"]: a for a in ray.get(registry.list_artifacts.remote(task_id="tiny-1w"))}
    assert artifacts["tiny-1w"]["kind"] == "merged" and artifacts["tiny-1w-lora"]["kind"] == "lora"
    assert artifacts["tiny-1w-lora"]["path"].endswith("tiny-1w/lora")


def test_progress_reaches_the_registry_while_training(ray_cluster, tiny_model_dir, chat_data):
    """Live progress arrives every logging step, not only at checkpoints, and never goes back."""
    import threading
    import time

    import ray

    from sage_ray.registry import get_registry

    cfg = TrainConfig(name="live", model=str(tiny_model_dir), data=str(chat_data), max_steps=40, batch_size=2,
                      max_length=128, save_steps=100, cpus_per_worker=1)
    runner = threading.Thread(target=finetune, args=(cfg,))
    runner.start()
    registry = get_registry(ray_cluster.sage_home)
    seen = []
    while runner.is_alive():
        job = ray.get(registry.get_job.remote("live"))
        if job and job["status"] == "training":
            seen.append((job["step"], job["progress"], len(job["loss_history"])))
        time.sleep(0.05)
    runner.join()
    assert len({step for step, _p, _n in seen}) >= 3, seen  # several distinct steps observed mid-run
    assert seen == sorted(seen), seen  # step, progress and history only grow
    assert ray.get(registry.get_job.remote("live"))["status"] == "completed"
