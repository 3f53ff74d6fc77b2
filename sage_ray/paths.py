"""Where sage-ray keeps its files: `$SAGE_HOME` (default `~/.sage`), laid out as SAGE did."""

from __future__ import annotations

import re
from pathlib import Path

from sage_ray import env
from sage_ray.artifacts import LORA_DIR, MERGED_DIR, META

_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def sage_home() -> Path:
    """The root of every artifact; read on each call so tests can point it elsewhere."""
    return Path(env.value("SAGE_HOME") or Path.home() / ".sage").expanduser()


def models_dir() -> Path:
    """Base models converted or built locally (the demo and tiny models live here)."""
    return sage_home() / "models"


def finetune_root() -> Path:
    """Parent of every task folder written by sage-ray."""
    return sage_home() / "studio_finetune"


def check_task_id(task_id: str) -> str:
    """Refuse ids that could escape the task folder or break a Ray job id."""
    if not _TASK_ID.match(task_id) or task_id in {".", ".."}:
        raise ValueError(
            f"task id {task_id!r} is not allowed: use letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, at most 128 characters"
        )
    return task_id


class TaskPaths:
    """The folder of one fine-tune task and the files MISSION.md promises inside it."""

    def __init__(self, task_id: str, root: Path | None = None):
        self.task_id = check_task_id(task_id)
        self.dir = (root or finetune_root()) / task_id

    lora = property(lambda self: self.dir / LORA_DIR)
    merged = property(lambda self: self.dir / MERGED_DIR)
    checkpoints = property(lambda self: self.dir / "checkpoints")
    logs = property(lambda self: self.dir / "logs")
    train_log = property(lambda self: self.dir / "train.log")
    meta = property(lambda self: self.dir / META)
    result = property(lambda self: self.dir / "train_result.json")
