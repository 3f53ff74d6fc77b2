"""`ray job submit -- python -m sage_ray.train x.yaml` against the test's own local cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import ray

from sage_ray import TrainConfig
from sage_ray.config import dump_train_config
from sage_ray.registry import get_registry

RAY = str(Path(sys.executable).parent / "ray")


def submit(ray_cluster, config: Path) -> subprocess.CompletedProcess:
    """Submit and follow the job; retried while the fresh cluster's job agent is still starting."""
    deadline = time.monotonic() + 60
    while True:
        proc = subprocess.run(
            [RAY, "job", "submit", "--address", ray_cluster.dashboard_url, "--",
             "python", "-m", "sage_ray.train", str(config)],
            capture_output=True, text=True, timeout=600,
        )
        if "No available agent" not in proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(2)


def test_job_submit_trains_and_writes_the_task(ray_cluster, tiny_model_dir, chat_data, tmp_path):
    config = tmp_path / "job.yaml"
    dump_train_config(TrainConfig(name="submitted", model=str(tiny_model_dir), data=str(chat_data), max_steps=3,
                                  batch_size=4, max_length=128, cpus_per_worker=1), config)
    proc = submit(ray_cluster, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "task submitted completed" in proc.stdout
    meta = json.loads((ray_cluster.sage_home / "studio_finetune" / "submitted" / "finetune_meta.json").read_text())
    assert meta["type"] == "lora" and meta["metrics"]["steps"] == 3


def test_job_with_bad_dataset_fails_with_the_dataset_error(ray_cluster, tiny_model_dir, tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "bye", "output": 3}\n')
    config = tmp_path / "bad.yaml"
    dump_train_config(TrainConfig(name="bad-data", model=str(tiny_model_dir), data=str(data)), config)
    proc = submit(ray_cluster, config)
    assert proc.returncode != 0
    assert "broken.jsonl, line 2" in proc.stdout + proc.stderr and "'output'" in proc.stdout + proc.stderr
    assert not (ray_cluster.sage_home / "studio_finetune" / "bad-data" / "finetune_meta.json").exists()
    job = ray.get(get_registry(ray_cluster.sage_home).get_job.remote("bad-data"))
    assert job["status"] == "failed" and "broken.jsonl, line 2" in job["error"]


def test_submitted_job_registers_itself(ray_cluster, tiny_model_dir, chat_data, tmp_path):
    job = ray.get(get_registry(ray_cluster.sage_home).get_job.remote("submitted"))
    if job is None:  # run alone: submit it here
        test_job_submit_trains_and_writes_the_task(ray_cluster, tiny_model_dir, chat_data, tmp_path)
        job = ray.get(get_registry(ray_cluster.sage_home).get_job.remote("submitted"))
    assert job["status"] == "completed" and job["ray_job_id"].startswith("raysubmit_")
    assert len(job["loss_history"]) == 3
