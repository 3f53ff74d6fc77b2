"""Discovery of fine-tunes and base models on disk, seeded with small fake folders (no Ray)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from sage_ray.paths import TaskPaths
from sage_ray.registry.actor import RegistryActor
from sage_ray.registry.discovery import discover, newest_checkpoint
from sage_ray.registry.store import RegistryStore
from sage_ray.train.meta import build_meta, write_json_atomic


def write(path: Path, content: str | dict = "x" * 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content) if isinstance(content, dict) else content)
    return path


def adapter(folder: Path, base: str = "Qwen/Qwen2.5-0.5B-Instruct", r: int = 8) -> Path:
    write(folder / "adapter_config.json", {"base_model_name_or_path": base, "r": r,
                                           "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"})
    write(folder / "adapter_model.safetensors", "w" * 100)
    return folder


def model(folder: Path, chat_template: str | None = None) -> Path:
    write(folder / "config.json", {"model_type": "qwen2"})
    write(folder / "model.safetensors", "w" * 200)
    write(folder / "tokenizer_config.json", {"chat_template": chat_template} if chat_template else {})
    return folder


def studio_task(home: Path, task_id: str, *, merged: bool, base_dir: Path) -> TaskPaths:
    """A completed sage-ray task folder with the meta the trainer writes."""
    paths = TaskPaths(task_id, root=home / "studio_finetune")
    adapter(paths.lora, base=str(base_dir))
    if merged:
        model(paths.merged, chat_template="{{ messages }}")
    meta = build_meta(paths, config={"lora": {"r": 8, "target_modules": "all-linear"}}, base_model="tiny",
                      base_model_path=str(base_dir), result={"final_loss": 1.25, "steps": 10},
                      started_at="2024-11-23T10:00:00+00:00", device="cpu", memory_estimate_gib=0.1)
    write_json_atomic(paths.meta, meta)
    return paths


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "sage_home"
    base = model(home / "models" / "tiny-base")  # a base without a chat template: training gives ours
    studio_task(home, "task_a", merged=False, base_dir=base)
    studio_task(home, "task_b", merged=True, base_dir=base)
    adapter(home / "studio_finetune" / "running" / "lora")  # no meta yet: still training
    write(home / "studio_finetune" / "broken_meta" / "finetune_meta.json", "{not json")
    write(home / "studio_finetune" / "empty_task" / "finetune_meta.json", {"task_id": "empty_task"})

    old = home / "finetune_output"
    for n in (99, 500, 1000):  # as strings, checkpoint-99 would sort last
        adapter(old / "old" / "checkpoints" / f"checkpoint-{n}", base="Qwen/Qwen2.5-Coder-1.5B")
    write(old / "old" / "checkpoints" / "checkpoint-2000" / "optimizer.pt")  # a save cut short
    write(old / "old" / "checkpoints" / "checkpoint-final" / "adapter_config.json", {})
    model(old / "both" / "merged_model")
    adapter(old / "both" / "lora_weights", base="Qwen/Qwen2.5-7B")
    adapter(old / "both" / "checkpoints" / "checkpoint-10")
    adapter(old / "weights_only" / "lora_weights", r=16)
    adapter(old / "task_a" / "lora_weights")  # same name as a sage-ray task
    (old / "empty").mkdir()
    write(old / "bad_json" / "lora_weights" / "adapter_config.json", "[1, 2")
    return home


def by_name(records: list[dict]) -> dict[str, dict]:
    names = [r["name"] for r in records]
    assert len(names) == len(set(names)), names
    return {r["name"]: r for r in records}


def test_studio_tasks(home: Path):
    found = by_name(discover(home))
    task_a = home / "studio_finetune" / "task_a"
    lora_only = found["task_a"]
    assert lora_only["kind"] == "lora" and lora_only["path"] == str(task_a / "lora")
    assert lora_only["task_id"] == "task_a" and lora_only["base_model"] == "tiny"
    assert lora_only["lora_rank"] == 8 and lora_only["target_modules"] == ["q_proj", "v_proj"]
    assert lora_only["size_bytes"] == sum(f.stat().st_size for f in (task_a / "lora").iterdir())
    assert lora_only["metrics"]["final_loss"] == 1.25 and lora_only["chat_template"] == "default"
    # merged is "the" model of a task (its bare id); its adapter is listed too
    assert found["task_b"]["kind"] == "merged"
    assert found["task_b"]["path"] == str(home / "studio_finetune" / "task_b" / "merged_model")
    assert found["task_b-lora"]["kind"] == "lora" and found["task_b-lora"]["task_id"] == "task_b"
    assert not {"running", "broken_meta", "empty_task"} & found.keys()


def test_older_sage_outputs(home: Path):
    found = by_name(discover(home))
    old = home / "finetune_output"
    assert found["old"]["path"] == str(old / "old" / "checkpoints" / "checkpoint-1000")
    assert found["old"]["kind"] == "lora" and found["old"]["base_model"] == "Qwen/Qwen2.5-Coder-1.5B"
    assert found["old"]["task_id"] is None
    assert found["both"]["kind"] == "merged" and found["both"]["path"] == str(old / "both" / "merged_model")
    assert found["both-lora"]["path"] == str(old / "both" / "lora_weights")  # the final adapter, not a checkpoint
    assert found["both-lora"]["base_model"] == "Qwen/Qwen2.5-7B"
    assert found["weights_only"]["kind"] == "lora" and found["weights_only"]["lora_rank"] == 16
    assert found["task_a-sage"]["path"] == str(old / "task_a" / "lora_weights")  # the sage-ray task keeps task_a
    assert found["tiny-base"]["kind"] == "base" and found["tiny-base"]["chat_template"] is None
    assert not {"empty", "bad_json"} & found.keys()


def test_newest_checkpoint_by_number(tmp_path: Path):
    for n in (500, 1000, 99):
        adapter(tmp_path / f"checkpoint-{n}")
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-1000"
    (tmp_path / "checkpoint-1000" / "adapter_config.json").unlink()
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-500"
    assert newest_checkpoint(tmp_path / "missing") is None


def test_broken_folders_are_skipped_with_a_warning(home: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="sage_ray.registry.discovery"):
        discover(home)
    warned = caplog.text
    for folder in ("broken_meta", "empty_task", "finetune_output/empty", "bad_json", "checkpoint-2000"):
        assert folder in warned, folder
    assert discover(home / "nowhere") == []


def test_registry_actor_registers_and_prunes_without_ray(home: Path):
    """The actor class is plain Python: discovery at start, then on demand, keeps the store
    in step with the disk."""
    registry = RegistryActor(str(home))
    names = {a["name"] for a in registry.list_artifacts()}
    assert {"task_a", "task_b", "task_b-lora", "old", "both", "both-lora", "tiny-base"} <= names
    assert registry.get_task_model("task_b")["kind"] == "merged"

    registry.set_active_model("task_a")
    shutil.rmtree(home / "studio_finetune" / "task_b" / "merged_model")  # un-merged
    shutil.rmtree(home / "studio_finetune" / "task_a")  # gone, but active: kept
    shutil.rmtree(home / "finetune_output" / "weights_only")
    registry.upsert_artifact({"name": "elsewhere", "kind": "base", "path": "/not/in/sage_home"})
    assert registry.discover() == len(discover(home))
    names = {a["name"]: a for a in RegistryStore(home / "registry.db").list_artifacts()}
    assert names["task_b"]["kind"] == "lora" and "task_b-lora" not in names
    assert "weights_only" not in names and "task_a" in names and "elsewhere" in names


def test_a_task_trained_elsewhere_is_registered_by_its_shared_copies(home: Path, monkeypatch: pytest.MonkeyPatch):
    """With SAGE_STORAGE the meta records the URIs; a node whose task folder lacks the models
    (they were written on a worker node) still registers both, by URI, and keeps them."""
    monkeypatch.setenv("SAGE_STORAGE", "s3://bucket/prefix")
    paths = studio_task(home, "remote_task", merged=True, base_dir=home / "models" / "tiny-base")
    meta = json.loads(paths.meta.read_text())
    assert meta["lora_uri"] == "s3://bucket/prefix/studio_finetune/remote_task/lora"
    assert meta["merged_uri"] == "s3://bucket/prefix/studio_finetune/remote_task/merged_model"
    assert meta["checkpoint_dir"] == "s3://bucket/prefix/studio_finetune/remote_task/checkpoints"
    shutil.rmtree(paths.lora)
    shutil.rmtree(paths.merged)

    found = by_name(discover(home))
    assert found["remote_task"]["kind"] == "merged" and found["remote_task"]["uri"] == meta["merged_uri"]
    assert found["remote_task-lora"]["uri"] == meta["lora_uri"]
    assert found["remote_task-lora"]["path"] == str(paths.lora) and found["remote_task-lora"]["size_bytes"] is None
    assert found["remote_task-lora"]["lora_rank"] == 8  # from the meta's config, the adapter not being here
    assert found["task_a"]["uri"] is None  # a task written without SAGE_STORAGE has no shared copy

    registry = RegistryActor(str(home))
    registry.discover()  # pruning keeps what exists only as a shared copy
    assert {"remote_task", "remote_task-lora"} <= {a["name"] for a in registry.list_artifacts()}
    assert registry.get_artifact("remote_task-lora")["uri"] == meta["lora_uri"]


def test_the_read_only_registry_shows_tasks_found_on_disk_and_writes_nothing(home: Path):
    import hashlib
    import sqlite3

    from sage_ray.registry.client import ReadOnlyRegistry

    store = RegistryStore(home / "registry.db")
    store.upsert_artifact({"name": "task_a", "kind": "lora", "path": str(home / "studio_finetune" / "task_a" / "lora"),
                           "task_id": "task_a"})
    store.create_job("task_b", config={}, status="completed")
    del store
    def contents() -> dict[str, str]:  # the database and its write-ahead log (-shm is readers' shared memory)
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(home.glob("registry.db*"))
                if not f.name.endswith("-shm")}

    before = contents()
    view = ReadOnlyRegistry(home)
    names = {a["name"] for a in view.list_artifacts()}
    assert {"task_a", "task_b"} <= names  # task_b is on disk only: found in memory
    assert view.get_task_model("task_b")["kind"] == "merged" and view.get_job("task_b")["status"] == "completed"
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        view.store.upsert_artifact({"name": "x", "kind": "base", "path": str(home / "models" / "tiny-base")})
    assert contents() == before


def test_the_read_only_registry_of_an_empty_home_creates_nothing(tmp_path: Path):
    from sage_ray.registry.client import ReadOnlyRegistry

    view = ReadOnlyRegistry(tmp_path / "nothing_here")
    assert view.list_artifacts() == [] and view.list_jobs() == [] and view.get_active_model() is None
    assert not (tmp_path / "nothing_here").exists()


def test_a_task_type_names_its_newest_completed_fine_tune(home: Path):
    from sage_ray.registry.client import ReadOnlyRegistry
    from sage_ray.serve.resolve import ModelRefError, find_artifact

    store = RegistryStore(home / "registry.db")
    for task_id, finished in (("task_b", "2026-01-02T00:00:00+00:00"), ("task_a", "2026-01-03T00:00:00+00:00")):
        store.create_job(task_id, config={"task": "code"})
        store.update_job(task_id, status="completed", finished_at=finished)
    store.create_job("running", config={"task": "qa"})
    view = ReadOnlyRegistry(home)
    assert find_artifact("code", view, [home])["task_id"] == "task_a"  # the newer of the two
    with pytest.raises(ModelRefError, match="no model named 'qa'"):  # its only job has not completed
        find_artifact("qa", view, [home])
