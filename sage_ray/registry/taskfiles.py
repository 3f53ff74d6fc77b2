"""A task folder's files as the registry actor serves them: it runs on the head node, where
SAGE_HOME lives, so a CLI on a laptop or a Studio replica on another node reads a job's log,
writes its config or removes its folder through the actor, never through its own disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sage_ray.paths import TaskPaths

CONFIG_NAME = "config.yaml"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints
MAX_CHUNK = 1 << 20


def task_paths(sage_home: Path, task_id: str) -> TaskPaths:
    return TaskPaths(task_id, root=sage_home / "studio_finetune")


def write_config(paths: TaskPaths, text: str) -> str:
    """Write the job's config.yaml into its task folder; return its path for the entrypoint."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    path = paths.dir / CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def append_log(log_path: Path, text: str) -> None:
    """Add whole lines to a task's train.log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(text)


def read_chunk(path: Path, offset: int, max_bytes: int = MAX_CHUNK) -> tuple[str, int]:
    """Whole lines of `path` from byte `offset`: (text, next offset). A line still being
    written stays for the next call, so a follower never prints half a line."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(max_bytes)
    except FileNotFoundError:
        return "", offset
    end = data.rfind(b"\n") + 1
    if end == 0 and len(data) < max_bytes:
        return "", offset
    end = end or len(data)  # one line longer than max_bytes: hand it over in pieces
    return data[:end].decode("utf-8", errors="replace"), offset + end


def read_tail(path: Path, lines: int | None) -> str:
    """The last `lines` lines of `path` (all when None); '' when there is no log yet."""
    try:
        with open(path, "rb") as f:
            if lines is None:
                return f.read().decode("utf-8", errors="replace")
            f.seek(0, os.SEEK_END)
            size, block, data = f.tell(), 64 * 1024, b""
            while size > 0 and data.count(b"\n") <= lines:
                step = min(block, size)
                size -= step
                f.seek(size)
                data = f.read(step) + data
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "".join(text.splitlines(keepends=True)[-lines:]) if lines else ""


def checkpoint_step(paths: TaskPaths) -> int | None:
    """The optimizer step of the checkpoint Ray Train will resume from, or None if there is none."""
    return checkpoint_step_at(str(paths.checkpoints))


def checkpoint_step_at(checkpoints: str) -> int | None:
    """The same for Ray Train's run folder `checkpoints`, a local path or a shared URI.

    Ray Train restores `latest_checkpoint_result` of its snapshot; each checkpoint reports its
    step (RayCheckpointCallback), and the Trainer's own state has it as a fallback."""
    from sage_ray import storage

    try:
        snapshot = storage.read_json(storage.join(checkpoints, SNAPSHOT)) or {}
        latest: dict[str, Any] | None = snapshot.get("latest_checkpoint_result")
        if not latest:
            return None
        step = (latest.get("metrics") or {}).get("step")
        if isinstance(step, int):
            return step
        state = storage.read_json(storage.join(checkpoints, latest["checkpoint_dir_name"], "checkpoint",
                                               "trainer_state.json")) or {}
        return int(state["global_step"])
    except (ValueError, KeyError, TypeError):
        return None


def remove_task_dir(paths: TaskPaths) -> bool:
    """Remove a task's folder and everything in it; False when there was none."""
    if not paths.dir.exists():
        return False
    shutil.rmtree(paths.dir)
    return True
