"""Keep the registry's record of a fine-tune in step with the run: status, progress, artifacts.

The driver owns the lifecycle (preparing -> training -> merging -> completed | failed); the
first worker sends every logging step's progress event straight to the registry actor, so
live progress does not wait for a checkpoint. Calls are fire-and-forget where a lost update
only delays a display, and awaited where a later step depends on them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sage_ray import env
from sage_ray.paths import TaskPaths
from sage_ray.registry.client import RegistryClient
from sage_ray.registry.queue import WAITING
from sage_ray.registry.status import ACTIVE, RUNNING, JobStatus


def ray_submission_id() -> str | None:
    """The Ray Jobs submission id when this process is a job's driver (`ray job submit`)."""
    raw = env.value("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


class Cancelled(BaseException):
    """The job was cancelled (SIGTERM from `ray job stop`, or the record says so): stop now.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


class JobTracker:
    """The driver's handle on its job record in the cluster's registry."""

    def __init__(self, task_id: str, sage_home: str | Path):
        self.task_id = task_id
        self.registry = RegistryClient(sage_home)
        self.registry.info()  # joined now: a registry serving another SAGE_HOME fails here, before training
        self.log_path: Path | None = None

    def begin(self, config: dict[str, Any], paths: TaskPaths) -> None:
        """Create the job record (queued), or take over the one `jobs.submit` or a resume made.

        A Ray job whose record was cancelled before its driver started stops here."""
        submission = ray_submission_id()
        self.log_path = paths.train_log
        fields = {"config": config, "log_path": str(paths.train_log), "ray_job_id": submission}
        job = self.registry.get_job(self.task_id)
        if job is None:
            self.registry.create_job(self.task_id, status=JobStatus.QUEUED, status_detail=WAITING, **fields)
            return
        if job["status"] == JobStatus.CANCELLED and submission and job["ray_job_id"] == submission:
            raise Cancelled(f"job {self.task_id} was cancelled before it started")
        self.registry.update_job(self.task_id, status=JobStatus.QUEUED, error=None, **fields)

    def wait_for_slot(self, need: dict[str, float], limit: int | None, poll_s: float = 1.0) -> dict[str, Any]:
        """Wait in the cluster's queue until the registry grants this job a slot (see registry.queue);
        returns the grant (its "borrow" names a GPU lent by the chat model)."""
        import ray

        from sage_ray.train.callbacks import write_log

        driver = ray.get_runtime_context().get_job_id()
        said = None
        while True:
            answer = self.registry.acquire_slot(self.task_id, need, limit, driver)
            if answer["granted"]:
                return answer
            if answer["status"] != JobStatus.QUEUED:
                raise Cancelled(f"job {self.task_id} is {answer['status']}; not starting it")
            if answer["detail"] != said:
                said = answer["detail"]
                write_log(self.log_path, f"queued: {said}")
            time.sleep(poll_s)

    def _update(self, **fields: Any) -> Any:
        """update_job on this run's own record: once a resume has resubmitted the task, this
        run (under Ray Jobs: its submission id) no longer owns it, and changes nothing."""
        return self.registry.update_job(self.task_id, owner=ray_submission_id(), **fields)

    def status(self, status: str, **fields: Any) -> None:
        self._update(status=status, **fields)

    def update(self, **fields: Any) -> None:
        self._update(**fields)

    def fail(self, error: BaseException) -> None:
        """Record how the run ended early; a status set meanwhile (a cancel) is kept."""
        if isinstance(error, (Cancelled, KeyboardInterrupt)):
            self._update(status=JobStatus.CANCELLED, status_detail=str(error) or "stopped",
                         only_if=ACTIVE)
            return
        message = str(error) or type(error).__name__
        self._update(status=JobStatus.FAILED, error=message, only_if=ACTIVE)

    def complete(self, paths: TaskPaths) -> None:
        """Mark the job completed, then register its artifacts (merged and LoRA).

        Compare-and-set first: a job cancelled in the last moment is not completed, its
        finished-looking meta file is removed, and no artifact of it is registered."""
        from sage_ray.registry import describe_task

        done = self._update(status=JobStatus.COMPLETED, progress=100.0, only_if=tuple(RUNNING))
        if done is None:
            paths.meta.unlink(missing_ok=True)
            raise Cancelled(f"job {self.task_id} was cancelled before it completed")
        for record in describe_task(paths.dir):
            self.registry.upsert_artifact(record)


class RegistrySink:
    """Sends a worker's progress events to the registry actor (in order: the actor is serial).

    Fire-and-forget, but the previous call's outcome is checked before the next one: when the
    actor was killed for good, the sink gets a new one (created from the durable store), so
    later progress still arrives; the events sent to the dead actor are lost, which the
    monotonic progress record tolerates."""

    def __init__(self, task_id: str, sage_home: str):
        self.task_id = task_id
        self.registry = RegistryClient(sage_home)
        self._last = None

    def __call__(self, event: dict) -> None:
        import ray

        if self._last is not None and ray.wait([self._last], timeout=0)[0]:
            self.registry.check_sent(self._last)  # a refused report (e.g. job deleted) must not stop training
        self._last = self.registry.send_progress(self.task_id, event)


class TaskLog:
    """How a worker writes the task's train.log: into the file when it runs on the registry's
    node; from any other node through the registry actor, which appends the lines (in order:
    the actor is serial) where `sage finetune logs` and the Studio read them. A node that
    shares no disk with the head would otherwise keep its lines to itself."""

    def __init__(self, paths: TaskPaths, registry: RegistryClient | None = None):
        self.paths = paths
        self.registry = registry  # None: write the file here
        self._last = None

    @classmethod
    def for_worker(cls, paths: TaskPaths, sage_home: str) -> "TaskLog":
        import ray

        registry = RegistryClient(sage_home)
        node = registry.info().get("node_id")
        return cls(paths, None if node in (None, ray.get_runtime_context().get_node_id()) else registry)

    def __call__(self, line: str, event: dict | None = None) -> None:
        from sage_ray.train.callbacks import log_text, write_log

        if self.registry is None:
            write_log(self.paths.train_log, line, event)
        else:
            self._last = self.registry.send_log(self.paths.task_id, log_text(line, event))

    def flush(self, timeout_s: float = 30) -> None:
        """Wait until the lines sent so far are written (before the worker exits)."""
        import ray

        if self._last is not None:
            ray.wait([self._last], timeout=timeout_s)


class FanOut:
    """Calls every sink with each event."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def __call__(self, event: dict) -> None:
        for sink in self.sinks:
            sink(event)
