"""finetune_meta.json: what a finished task is, written once its artifacts are complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sage_ray import storage
from sage_ray.artifacts import MERGED_DIR
from sage_ray.paths import TaskPaths
from sage_ray.registry.store import now_iso
from sage_ray.registry.status import JobStatus
from sage_ray.train.publish import artifact_uri


OPTIONAL_METRICS = ("final_metrics", "eval_loss", "eval_token_accuracy", "best_eval_loss", "best_eval_step")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers never see a half-written file: write beside it, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_meta(paths: TaskPaths) -> dict[str, Any]:
    if not paths.meta.exists():
        raise FileNotFoundError(f"task {paths.task_id!r} has no finetune_meta.json in {paths.dir}: it has not completed")
    return json.loads(paths.meta.read_text(encoding="utf-8"))


def build_meta(paths: TaskPaths, *, config: dict, base_model: str, base_model_path: str,
               result: dict, started_at: str, device: str, memory_estimate_gib: float) -> dict[str, Any]:
    merged = paths.merged.is_dir()
    shared = storage.task_uri(paths.task_id)
    return {
        "task_id": paths.task_id,
        "type": "merged" if merged else "lora",
        "base_model": base_model,
        "base_model_path": base_model_path,
        "output_dir": str(paths.dir),
        "lora_path": str(paths.lora),
        "merged_path": str(paths.merged) if merged else None,
        # the shared copies (SAGE_STORAGE), which nodes without this folder fetch
        "lora_uri": artifact_uri(paths.task_id, "lora"),
        "merged_uri": artifact_uri(paths.task_id, MERGED_DIR) if merged else None,
        "lora_bytes": result.get("lora_bytes"),
        "checkpoint_dir": storage.join(shared, "checkpoints") if shared else str(paths.checkpoints),
        "log_path": str(paths.train_log),
        "tensorboard_dir": str(paths.logs),
        "status": JobStatus.COMPLETED,
        "started_at": started_at,
        "completed_at": now_iso(),
        "config": config,
        "dataset": result.get("dataset"),
        "metrics": {key: result.get(key) for key in (
            "train_loss", "final_loss", "steps", "epochs", "train_seconds", "tokens_seen",
            "tokens_per_s", "steady_tokens_per_s", "workers", "device", "final_metrics", "eval_loss",
            "eval_token_accuracy", "best_eval_loss", "best_eval_step")
            # final_metrics: a preference run's rewards; eval figures: a run with a validation set
            if key in result or key not in OPTIONAL_METRICS},
        "loss_history": result.get("loss_history", []),
        "eval_history": result.get("eval_history", []),
        "kept": result.get("kept"),  # keep 'best': the step whose adapter was exported, and its eval loss
        "device": device,
        "memory_estimate_gib": round(memory_estimate_gib, 3),
    }


def mark_merged(paths: TaskPaths, merged_uri: str | None = None) -> dict[str, Any]:
    """Update the meta after a merge (at the end of training or a later `sage finetune merge`)."""
    meta = read_meta(paths)
    meta.update(type="merged", merged_path=str(paths.merged), merged_uri=merged_uri, merged_at=now_iso())
    write_json_atomic(paths.meta, meta)
    return meta
