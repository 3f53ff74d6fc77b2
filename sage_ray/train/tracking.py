"""Keep the registry's record of a fine-tune in step with the run: status, progress, artifacts.

The driver owns the lifecycle (preparing -> training -> merging -> completed | failed); the
first worker sends every logging step's progress event straight to the registry actor, so
live progress does not wait for a checkpoint. Calls are fire-and-forget where a lost update
only delays a display, and awaited where a later step depends on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sage_ray.paths import TaskPaths


def ray_submission_id() -> str | None:
    """The Ray Jobs submission id when this process is a job's driver (`ray job submit`)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


class JobTracker:
    """The driver's handle on its job record in the cluster's registry."""

    def __init__(self, task_id: str, sage_home: str | Path):
        import ray

        from sage_ray.registry import get_registry

        self._ray = ray
        self.task_id = task_id
        self.registry = get_registry(sage_home)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._ray.get(getattr(self.registry, method).remote(*args, **kwargs))

    def begin(self, config: dict[str, Any], paths: TaskPaths) -> None:
        """Create the job record, or take over the one `sage finetune start` made (or a resumed run's)."""
        fields = {"config": config, "log_path": str(paths.train_log), "ray_job_id": ray_submission_id()}
        if self._call("get_job", self.task_id) is None:
            self._call("create_job", self.task_id, status="preparing", **fields)
        else:
            self._call("update_job", self.task_id, status="preparing", error=None, **fields)

    def status(self, status: str, **fields: Any) -> None:
        self._call("update_job", self.task_id, status=status, **fields)

    def fail(self, error: BaseException) -> None:
        message = str(error) or type(error).__name__
        self._call("update_job", self.task_id, status="failed", error=message,
                   only_if=("queued", "preparing", "training", "merging"))

    def complete(self, paths: TaskPaths) -> None:
        """Register the task's artifacts (merged and LoRA), then mark the job completed."""
        from sage_ray.registry import describe_task

        for record in describe_task(paths.dir):
            self._call("upsert_artifact", record)
        self._call("update_job", self.task_id, status="completed", progress=100.0)


class RegistrySink:
    """Sends a worker's progress events to the registry actor (in order: the actor is serial)."""

    def __init__(self, task_id: str, sage_home: str):
        from sage_ray.registry import get_registry

        self.task_id = task_id
        self.registry = get_registry(sage_home)

    def __call__(self, event: dict) -> None:
        self.registry.report_progress.remote(self.task_id, event)


class FanOut:
    """Calls every sink with each event."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def __call__(self, event: dict) -> None:
        for sink in self.sinks:
            sink(event)
