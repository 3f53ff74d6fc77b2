"""The registry actor on the session's real Ray cluster: created on first use, discovery at
start, and every record kept across a kill (state lives in SQLite, not in the actor).

Isolation: these tests use their own actor name and their own SAGE_HOME folder inside the
session one, so the cluster's default registry (used by other tests) is never touched, and
the fixture kills the detached actor it made.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import ray

from sage_ray.registry import NAMESPACE, InUseError, RegistryMismatchError, get_registry

pytestmark = pytest.mark.ray


def seed_sage_output(home: Path) -> None:
    """An older SAGE fine-tune: checkpoint-1000 must win over checkpoint-500."""
    for n in (500, 1000):
        folder = home / "finetune_output" / "old_sage" / "checkpoints" / f"checkpoint-{n}"
        folder.mkdir(parents=True)
        config = {"base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "r": 4}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64)


@pytest.fixture
def registry_home(ray_cluster):
    """A fresh SAGE_HOME and actor name; the detached actor is killed afterwards."""
    token = secrets.token_hex(3)
    home = ray_cluster.sage_home / f"registry_test_{token}"
    home.mkdir()
    name = f"sage_registry_test_{token}"
    yield home, name
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass  # no actor by that name (the test killed it last)


def call(handle, method: str, *args, **kwargs):
    return ray.get(getattr(handle, method).remote(*args, **kwargs), timeout=30)


def test_get_registry_creates_one_actor_and_discovers_at_start(registry_home):
    home, name = registry_home
    seed_sage_output(home)
    registry = get_registry(home, name=name)
    info = call(registry, "info")
    assert info["sage_home"] == str(home) and Path(info["db_path"]) == home / "registry.db"
    old = call(registry, "get_artifact", "old_sage")
    assert old["path"].endswith("checkpoints/checkpoint-1000") and old["kind"] == "lora"
    assert old["base_model"] == "Qwen/Qwen2.5-0.5B" and old["lora_rank"] == 4
    # get-if-exists: a second call finds the same actor instead of starting another
    assert call(get_registry(home, name=name), "info")["pid"] == info["pid"]
    with pytest.raises(RegistryMismatchError, match="SAGE_HOME"):
        get_registry(home / "elsewhere", name=name)


def test_records_survive_killing_the_actor(registry_home):
    home, name = registry_home
    registry = get_registry(home, name=name)
    call(registry, "create_job", "job1", config={"epochs": 1}, ray_job_id="job1")
    for step in (1, 2, 3):
        assert call(registry, "report_progress", "job1", {"step": step, "total_steps": 10, "loss": 3.0 - step})
    call(registry, "upsert_artifact", {"name": "job1", "kind": "lora", "path": str(home / "x"), "task_id": "job1"})
    call(registry, "set_active_model", "job1")
    first_pid = call(registry, "info")["pid"]

    ray.kill(registry, no_restart=True)
    registry = get_registry(home, name=name)  # a new actor, rebuilt from the store
    assert call(registry, "info")["pid"] != first_pid
    job = call(registry, "get_job", "job1")
    assert job["status"] == "training" and job["step"] == 3 and job["config"] == {"epochs": 1}
    assert job["loss_history"] == [[1, 2.0], [2, 1.0], [3, 0.0]]
    assert call(registry, "get_artifact", "job1")["task_id"] == "job1"
    assert call(registry, "get_active_model") == "job1"
    with pytest.raises(InUseError, match="active model"):  # the store's errors reach the caller as such
        call(registry, "delete_artifact", "job1")
    # the job's later progress still arrives, and a stale one is still refused
    assert call(registry, "report_progress", "job1", {"step": 4, "loss": 0.5})
    assert not call(registry, "report_progress", "job1", {"step": 2, "loss": 9.0})

    # a crash (kill with restart allowed): Ray brings it back and the same handle keeps working
    ray.kill(registry, no_restart=False)
    assert call(registry, "get_job", "job1")["step"] == 4
