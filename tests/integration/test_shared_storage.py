"""SAGE_STORAGE on an object store, end to end: a fine-tune submitted as a Ray job on the
session's cluster writes its Ray Train checkpoints, adapter and merged model to a real S3
server (moto's, on 127.0.0.1); the registry records their URIs; a node without the task's
folder fetches checksum-verified copies into its cache and serves them (the path a serving
replica on another node takes); delete removes the shared copy too.

The job and its Ray Train workers do not inherit this process's environment: they get the
storage settings only through what sage-ray forwards (credentials through a file, as on a
real cluster, never as variables).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sage_ray import TrainConfig, jobs, storage
from sage_ray.registry.taskfiles import checkpoint_step_at
from sage_ray.serve.engines import create_engine
from sage_ray.serve.engines.base import SamplingParams, complete
from sage_ray.serve.model_registry import ServingRegistry
from sage_ray.serve.settings import StudioSettings
from tests.s3_storage import use_s3_storage

pytestmark = pytest.mark.ray
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def shared_storage(ray_cluster, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The storage settings, set after the cluster started: they reach the job only by forwarding."""
    return use_s3_storage(monkeypatch, s3_server, tmp_path)


def keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=client.bucket, Prefix=prefix)
    return {item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])}


def served_reply(spec) -> str:
    async def reply() -> str:
        engine = create_engine("hf", device="cpu")
        try:
            await engine.start(spec)
            params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
            return (await complete(engine.chat(QUESTION, params=params))).text
        finally:
            await engine.shutdown()
    return asyncio.run(reply())


def test_finetune_to_s3_then_serve_from_another_node(shared_storage, ray_cluster, tiny_model_dir, chat_data):
    s3, home = shared_storage, ray_cluster.sage_home
    cfg = TrainConfig(name="shared-s3", model=str(tiny_model_dir), data=str(chat_data), batch_size=2,
                      max_length=128, cpus_per_worker=1, lora={"r": 4}, max_steps=6, save_steps=3, merge=True)
    task_id = jobs.submit(cfg)
    done = jobs.wait(task_id, timeout_s=300)
    assert done["status"] == "completed", done

    # Everything a node without this machine's disk needs is in the bucket ...
    task_prefix = f"sage/studio_finetune/{task_id}/"
    stored = keys(s3, task_prefix)
    assert {"lora/sage_manifest.json", "lora/adapter_config.json", "lora/adapter_model.safetensors",
            "merged_model/sage_manifest.json", "merged_model/config.json", "train_result.json",
            "checkpoints/checkpoint_manager_snapshot.json"} <= stored, sorted(stored)
    assert any(k.startswith("checkpoints/checkpoint_") and k.endswith("/checkpoint/trainer_state.json")
               for k in stored), sorted(stored)
    # the dataset too: the workers read a checksum-verified copy from the store, not the head's path
    digest = hashlib.sha256(Path(chat_data).read_bytes()).hexdigest()
    assert {"sage_manifest.json", Path(chat_data).name} <= keys(s3, f"sage/datasets/{digest[:32]}/")
    worker_read = [line for line in (home / "studio_finetune" / task_id / "train.log").read_text().splitlines()
                   if " dataset " in line]
    assert worker_read and f"{home / 'cache'}/" in worker_read[0], worker_read
    task_uri = f"s3://{s3.bucket}/{task_prefix.rstrip('/')}"
    assert checkpoint_step_at(storage.join(task_uri, "checkpoints")) == 6  # what a resume reads
    task_dir = home / "studio_finetune" / task_id
    assert not (task_dir / "checkpoints").exists()  # Ray Train wrote them to the store only

    # ... and the registry records the URIs next to the paths.
    artifacts = {a["kind"]: a for a in jobs._registry().list_artifacts(task_id=task_id)}
    assert artifacts["merged"]["uri"] == f"{task_uri}/merged_model"
    assert artifacts["lora"]["uri"] == f"{task_uri}/lora"
    assert artifacts["lora"]["name"] == f"{task_id}-lora"

    # "Another node": the task's folders are not there, only the head's meta and log.
    shutil.rmtree(task_dir / "lora")
    shutil.rmtree(task_dir / "merged_model")
    assert jobs._registry().discover() >= 2
    still = {a["kind"]: a for a in jobs._registry().list_artifacts(task_id=task_id)}
    assert still["lora"]["uri"] == artifacts["lora"]["uri"] and still["lora"]["size_bytes"] is None
    assert still["merged"]["uri"] == artifacts["merged"]["uri"]
    meta = json.loads((task_dir / "finetune_meta.json").read_text())
    assert meta["lora_uri"] == artifacts["lora"]["uri"] and meta["merged_uri"] == artifacts["merged"]["uri"]
    assert meta["lora_bytes"] == storage.read_manifest(meta["lora_uri"])["total_bytes"] > 0

    # What the LLM replica does on its node: resolve through the registry, fetch, verify, load.
    # the base was trained from a folder outside SAGE_HOME: the Studio serves from it once allowed
    serving = ServingRegistry(StudioSettings(sage_home=str(home), allowed_roots=[str(tiny_model_dir.parent)]))
    lora_spec = serving.spec(f"{task_id}-lora")
    merged_spec = serving.spec(task_id)
    cache = home / "cache"
    assert Path(lora_spec.path).parent == cache and Path(merged_spec.path).parent == cache
    assert lora_spec.base_path == str(tiny_model_dir)  # the adapter's base, from its adapter_config
    manifest = storage.read_manifest(artifacts["lora"]["uri"])
    assert sorted(manifest["files"]) == sorted(p.relative_to(lora_spec.path).as_posix()
                                              for p in Path(lora_spec.path).rglob("*")
                                              if p.is_file() and p.name != storage.CACHE_MARKER)
    # the adapter on its base and the merged model are the same model: the same greedy reply
    assert served_reply(lora_spec) == served_reply(merged_spec)
    assert len(served_reply(lora_spec)) > 0

    # A second resolution reuses the cache (no new entry), and delete removes the shared copy.
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert serving.spec(f"{task_id}-lora").path == lora_spec.path
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == entries
    jobs.delete(task_id)
    assert keys(s3, task_prefix) == set()
