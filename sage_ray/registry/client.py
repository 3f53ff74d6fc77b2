"""The one door to the registry: typed calls to the cluster's registry actor, and a read-only
view of the store for a CLI that finds no cluster.

Every other module talks to the registry through `RegistryClient`: one method per actor
method (a typo fails at import or in a linter, not in a job hours later), one reconnect
policy (an actor killed for good is replaced once, from its durable store), and the
registry's own errors passed through unchanged for the caller to translate.

`ReadOnlyRegistry` answers the same read methods from `registry.db` opened read-only, with
discovery run in memory: a `sage llm model show` beside a running actor or on a machine
without a cluster never writes the file whose one-writer design the job queue relies on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Collection

from sage_ray.paths import sage_home as default_sage_home
from sage_ray.registry import taskfiles
from sage_ray.registry.actor import DB_NAME, RegistryActor
from sage_ray.registry.discovery import discover
from sage_ray.registry.store import ArtifactRecord, JobRecord, JobStatus, RegistryStore, SwitchRecord


class RegistryClient:
    """Typed calls to the cluster's registry actor (`get_registry`); blocking, so call it from
    threads (FastAPI sync routes, Gradio callbacks, `asyncio.to_thread`), never on an event loop."""

    def __init__(self, sage_home: str | os.PathLike | None = None, handle: Any = None):
        self.sage_home = str(sage_home) if sage_home else None
        self._handle = handle

    @property
    def handle(self):
        if self._handle is None:
            from sage_ray.registry.actor import get_registry

            self._handle = get_registry(self.sage_home)
        return self._handle

    def _reconnect(self) -> None:
        from sage_ray.registry.actor import get_registry

        self._handle = get_registry(self.sage_home)

    def _call(self, method: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run `RegistryActor.<method>` on the actor and wait; an actor killed for good (Ray
        restarts a crashed one by itself) is looked up or created again, once."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(getattr(self.handle, method.__name__).remote(*args, **kwargs))
        except RayActorError:
            self._reconnect()
            return ray.get(getattr(self.handle, method.__name__).remote(*args, **kwargs))

    def _send(self, method: Callable, *args: Any, **kwargs: Any):
        """Fire and forget: the actor runs one caller's calls in the order sent; returns the ref."""
        return getattr(self.handle, method.__name__).remote(*args, **kwargs)

    def check_sent(self, ref) -> None:
        """After a fire-and-forget call has finished: a dead actor is replaced for the next one;
        a refused call (e.g. the job was deleted) is dropped: it only delayed a display."""
        import ray
        from ray.exceptions import RayActorError

        try:
            ray.get(ref)
        except RayActorError:
            self._reconnect()
        except Exception:
            pass

    # ---- the actor's methods, one each -------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self._call(RegistryActor.info)

    def discover(self, prune: bool = True) -> int:
        return self._call(RegistryActor.discover, prune=prune)

    def upsert_artifact(self, record: ArtifactRecord, *, replace: bool = True) -> ArtifactRecord:
        return self._call(RegistryActor.upsert_artifact, record, replace=replace)

    def get_artifact(self, name: str) -> ArtifactRecord | None:
        return self._call(RegistryActor.get_artifact, name)

    def list_artifacts(self, kind: str | None = None, task_id: str | None = None) -> list[ArtifactRecord]:
        return self._call(RegistryActor.list_artifacts, kind, task_id)

    def get_task_model(self, task_id: str) -> ArtifactRecord | None:
        return self._call(RegistryActor.get_task_model, task_id)

    def delete_artifact(self, name: str) -> None:
        self._call(RegistryActor.delete_artifact, name)

    def create_job(self, task_id: str, **fields: Any) -> JobRecord:
        return self._call(RegistryActor.create_job, task_id, **fields)

    def update_job(self, task_id: str, *, only_if: Collection[str] | None = None, owner: str | None = None,
                   **fields: Any) -> JobRecord | None:
        return self._call(RegistryActor.update_job, task_id, only_if=only_if, owner=owner, **fields)

    def send_progress(self, task_id: str, event: dict[str, Any]):
        return self._send(RegistryActor.report_progress, task_id, event)

    def report_progress(self, task_id: str, event: dict[str, Any]) -> bool:
        return self._call(RegistryActor.report_progress, task_id, event)

    def rewind_progress(self, task_id: str, step: int) -> JobRecord:
        return self._call(RegistryActor.rewind_progress, task_id, step)

    def get_job(self, task_id: str) -> JobRecord | None:
        return self._call(RegistryActor.get_job, task_id)

    def list_jobs(self, status: str | Collection[str] | None = None) -> list[JobRecord]:
        return self._call(RegistryActor.list_jobs, status)

    def delete_job(self, task_id: str, *, with_artifacts: bool = False, force: bool = False) -> None:
        self._call(RegistryActor.delete_job, task_id, with_artifacts=with_artifacts, force=force)

    def set_active_model(self, name_or_path: str | None) -> None:
        self._call(RegistryActor.set_active_model, name_or_path)

    def get_active_model(self) -> str | None:
        return self._call(RegistryActor.get_active_model)

    def record_switch(self, action: str, to_model: str, *, from_model: str | None = None, who: str | None = None,
                      figures: dict[str, Any] | None = None) -> SwitchRecord:
        return self._call(RegistryActor.record_switch, action, to_model, from_model=from_model, who=who,
                          figures=figures)

    def list_switches(self, limit: int = 50) -> list[SwitchRecord]:
        return self._call(RegistryActor.list_switches, limit)

    def set_serving(self, state: dict[str, Any]):
        """Fire and forget: nobody waits on the serving record."""
        return self._send(RegistryActor.set_serving, state)

    def get_serving(self) -> dict[str, Any] | None:
        return self._call(RegistryActor.get_serving)

    def acquire_slot(self, task_id: str, need: dict[str, float], limit: int | None = None,
                     driver: str | None = None) -> dict[str, Any]:
        return self._call(RegistryActor.acquire_slot, task_id, need, limit, driver)

    def write_config(self, task_id: str, text: str) -> str:
        return self._call(RegistryActor.write_config, task_id, text)

    def send_log(self, task_id: str, text: str):
        return self._send(RegistryActor.append_log, task_id, text)

    def read_log(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        return self._call(RegistryActor.read_log, task_id, offset)

    def tail_log(self, task_id: str, lines: int | None = None) -> str:
        return self._call(RegistryActor.tail_log, task_id, lines)

    def checkpoint_step(self, task_id: str) -> int | None:
        return self._call(RegistryActor.checkpoint_step, task_id)

    def delete_task(self, task_id: str) -> bool:
        return self._call(RegistryActor.delete_task, task_id)


class ReadOnlyRegistry:
    """The registry's read methods from `$SAGE_HOME/registry.db` opened read-only, for a CLI on
    a machine where no cluster runs. Finished tasks not yet registered are found on disk and
    shown (discovery in memory); nothing is written."""

    def __init__(self, sage_home: str | os.PathLike | None = None):
        self.sage_home = Path(sage_home or default_sage_home()).expanduser().absolute()
        db = self.sage_home / DB_NAME
        self.store = RegistryStore(db, read_only=True) if db.exists() else None

    def list_artifacts(self, kind: str | None = None, task_id: str | None = None) -> list[ArtifactRecord]:
        stored = self.store.list_artifacts(kind=kind, task_id=task_id) if self.store else []
        known = {a["path"] for a in stored} | {a["name"] for a in stored}
        unfinished = {j["task_id"] for j in self.list_jobs((JobStatus.FAILED, JobStatus.CANCELLED))}
        found = [r for r in discover(self.sage_home) if r["path"] not in known and r["name"] not in known
                 and r.get("task_id") not in unfinished and (kind is None or r["kind"] == kind)
                 and (task_id is None or r.get("task_id") == task_id)]
        return stored + found

    def get_artifact(self, name: str) -> ArtifactRecord | None:
        return next((a for a in self.list_artifacts() if a["name"] == name), None)

    def get_task_model(self, task_id: str) -> ArtifactRecord | None:
        return next(iter(self.list_artifacts(task_id=task_id)), None)  # merged first, as the store orders

    def get_job(self, task_id: str) -> JobRecord | None:
        return self.store.get_job(task_id) if self.store else None

    def list_jobs(self, status: str | Collection[str] | None = None) -> list[JobRecord]:
        return self.store.list_jobs(status) if self.store else []

    def get_active_model(self) -> str | None:
        return self.store.get_active_model() if self.store else None

    def get_serving(self) -> dict[str, Any] | None:
        return self.store.get_serving() if self.store else None

    def list_switches(self, limit: int = 50) -> list[SwitchRecord]:
        return self.store.list_switches(limit) if self.store else []

    def tail_log(self, task_id: str, lines: int | None = None) -> str:
        return taskfiles.read_tail(taskfiles.task_paths(self.sage_home, task_id).train_log, lines)

    def read_log(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        return taskfiles.read_chunk(taskfiles.task_paths(self.sage_home, task_id).train_log, offset)


def reader(address: str | None = None) -> RegistryClient | ReadOnlyRegistry:
    """What a read-only command uses: the live actor when a cluster runs (found, never started),
    else the store on this machine's disk opened read-only."""
    from sage_ray.cluster import find_cluster

    try:
        found = find_cluster(address)
    except Exception:  # an unreachable address: read what this machine has
        found = None
    return RegistryClient() if found is not None else ReadOnlyRegistry()
