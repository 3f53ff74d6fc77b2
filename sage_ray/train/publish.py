"""A task's models on shared storage (`SAGE_STORAGE`), next to its folder in SAGE_HOME.

Training always writes the task folder on the node that does the work; with SAGE_STORAGE
set, the first worker also uploads the adapter and the run's figures to the task's URI, and
the driver uploads the merged model, so a node that lacks the folder (the head running the
registry, a serving node) fetches a checksum-verified copy instead. Without SAGE_STORAGE
every function here is a no-op and paths stay local: the single-machine default.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sage_ray import storage
from sage_ray.artifacts import MERGED_DIR, is_adapter
from sage_ray.paths import TaskPaths

RESULT = "train_result.json"


def artifact_uri(task_id: str, folder: str) -> str | None:
    """The shared URI of a task's `lora` or `merged_model` folder, None without SAGE_STORAGE."""
    root = storage.task_uri(task_id)
    return storage.join(root, folder) if root else None


def checkpoint_location(paths: TaskPaths) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: the shared task URI, so
    a resumed run finds its checkpoints from any node; else the local task folder."""
    root = storage.task_uri(paths.task_id)
    if root is None:
        return str(paths.dir), None
    fs, path = storage.filesystem(root)
    return path, fs


def publish_run(paths: TaskPaths, result: dict[str, Any]) -> dict[str, Any]:
    """On the first worker after training: share the adapter and the run's figures; returns
    the figures with the shared adapter's size (what train_result.json records)."""
    root = storage.task_uri(paths.task_id)
    if root is None:
        return result
    manifest = storage.upload_dir(paths.lora, storage.join(root, "lora"))
    result = {**result, "lora_bytes": manifest["total_bytes"]}
    storage.write_json(storage.join(root, RESULT), result)
    return result


def run_result(paths: TaskPaths) -> dict[str, Any]:
    """train_result.json from the task folder here, else the copy the first worker shared
    (it ran on another node)."""
    if paths.result.is_file():
        return json.loads(paths.result.read_text())
    root = storage.task_uri(paths.task_id)
    shared = storage.read_json(storage.join(root, RESULT)) if root else None
    if shared is None:
        raise FileNotFoundError(f"{paths.result} was not written, and no shared copy exists"
                                + (f" at {storage.join(root, RESULT)}" if root else ""))
    return shared


def local_adapter(paths: TaskPaths) -> Path:
    """The task's adapter folder on this machine: its own lora/, else fetched from storage."""
    uri = artifact_uri(paths.task_id, "lora")
    if is_adapter(paths.lora) or uri is None:
        return paths.lora
    return storage.fetch(uri)


def publish_merged(paths: TaskPaths) -> str | None:
    """Share the merged model the driver just wrote; its URI, or None without SAGE_STORAGE."""
    uri = artifact_uri(paths.task_id, MERGED_DIR)
    if uri is not None:
        storage.upload_dir(paths.merged, uri)
    return uri


def merge_task(paths: TaskPaths, base_model_path: str | Path) -> None:
    """Merge a task's adapter into its base, share the result, and record it in the meta."""
    from sage_ray.train.merge import merge_adapter
    from sage_ray.train.meta import mark_merged

    merge_adapter(local_adapter(paths), base_model_path, paths.merged)
    mark_merged(paths, merged_uri=publish_merged(paths))


def forget(task_id: str) -> bool:
    """Remove a deleted task's shared copy; True if there was one."""
    root = storage.task_uri(task_id)
    return storage.delete_tree(root) if root else False


def share_dataset(path: str) -> str:
    """What the workers read the dataset from: with SAGE_STORAGE, its shared copy (uploaded once,
    content-addressed, `<SAGE_STORAGE>/datasets/<sha256>/<file>`), so a training node without
    the head's disk gets it checksum-verified; else the path itself."""
    root = storage.shared_root()
    if root is None:
        return path
    source = Path(path)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    uri = storage.join(root, "datasets", digest[:32])
    try:
        known = storage.read_manifest(uri)["files"].get(source.name, {}).get("sha256") == digest
    except storage.StorageError:  # not uploaded yet
        known = False
    if not known:
        with tempfile.TemporaryDirectory() as folder:
            shutil.copyfile(source, Path(folder) / source.name)
            storage.upload_dir(folder, uri)
    return storage.join(uri, source.name)


def local_dataset(data: str) -> str:
    """A worker's local path for `data`: a shared copy is fetched into this node's verified cache."""
    if not storage.is_uri(data):
        return data
    folder, _, name = data.rpartition("/")
    return str(storage.fetch(folder) / name)
