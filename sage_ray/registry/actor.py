"""The registry actor: one named, detached Ray actor per cluster in front of the durable store.

Every record lives in SQLite (`$SAGE_HOME/registry.db`), never only in the actor's memory, so
an actor that is killed, crashes or comes back after `ray stop` reopens the file and sees
everything. Ray restarts a crashed actor by itself (max_restarts=-1) and replays calls that
were in flight (max_task_retries=-1): that is safe because the store's writes are idempotent
(upserts, absolute updates, progress guarded by step) except create/delete, where a replayed
call may answer "already exists" / "not found" for work that was in fact done.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Collection

from sage_ray.paths import sage_home as default_sage_home
from sage_ray.registry import taskfiles
from sage_ray.registry.discovery import discover
from sage_ray.registry.queue import SlotQueue, ray_cluster_state
from sage_ray.registry.status import RESUMABLE, TERMINAL
from sage_ray.registry.store import (ArtifactRecord, InUseError, JobRecord, NotFoundError, RegistryError,
                                     RegistryStore, SwitchRecord)

ACTOR_NAME = "sage_registry"
NAMESPACE = "sage"
DB_NAME = "registry.db"
DISCOVERY_ROOTS = ("studio_finetune", "finetune_output", "models")
log = logging.getLogger(__name__)


class RegistryMismatchError(RegistryError):
    """The cluster's registry actor serves another SAGE_HOME than the caller's."""


class RegistryActor:
    """RegistryStore plus discovery; Ray runs it as the cluster's registry actor.

    `sage_home` is passed in, not read from the environment: the actor's process may not
    have the caller's SAGE_HOME.
    """

    def __init__(self, sage_home: str, *, discover_on_start: bool = True):
        self.sage_home = Path(sage_home).expanduser().absolute()
        self.store = RegistryStore(self.sage_home / DB_NAME)
        self.queue = SlotQueue(ray_cluster_state)
        if discover_on_start:
            try:
                self.discover()
            except Exception:  # the registry must come up even if the disk holds surprises
                log.exception("registry discovery at start failed; records in the store are still served")

    def info(self) -> dict[str, Any]:
        """Where this registry keeps its state, and which process (on which node) serves it."""
        return {"sage_home": str(self.sage_home), "db_path": str(self.store.db_path), "pid": os.getpid(),
                "node_id": _node_id()}

    def discover(self, prune: bool = True) -> int:
        """Register what discovery finds on disk; return how many artifacts it found. With
        `prune`, also forget records under SAGE_HOME's model folders whose files are gone or
        that duplicate a discovered path under an old name (a task merged, then un-merged)."""
        # a task whose job was cancelled or failed may hold a finished-looking folder (a cancel
        # that raced the last write): never register its files as a complete model
        unfinished = {job["task_id"] for job in self.store.list_jobs(RESUMABLE)}
        found = [record for record in discover(self.sage_home) if record.get("task_id") not in unfinished]
        for record in found:
            self.store.upsert_artifact(record)
        if prune:
            self._prune(found)
        return len(found)

    def _prune(self, found: list[ArtifactRecord]) -> None:
        roots = [self.sage_home / name for name in DISCOVERY_ROOTS]
        name_of = {record["path"]: record["name"] for record in found}
        for artifact in self.store.list_artifacts():
            path = Path(artifact["path"])
            if not any(path.is_relative_to(root) for root in roots):
                continue  # registered by hand elsewhere: not discovery's to judge
            # found now (on disk, or only as a shared copy) or still on disk, under this name: kept
            present = path.exists() or artifact["path"] in name_of
            if present and name_of.get(artifact["path"], artifact["name"]) == artifact["name"]:
                continue
            try:
                self.store.delete_artifact(artifact["name"])
                log.info("registry: forgot %s (%s): no longer on disk as that name", artifact["name"], path)
            except InUseError:
                log.warning("registry: %s is gone from disk but is the active model; kept", artifact["name"])
            except NotFoundError:
                pass  # another caller removed it meanwhile

    # The methods below mirror RegistryStore (see there for the rules).

    def upsert_artifact(self, record: ArtifactRecord, *, replace: bool = True) -> ArtifactRecord:
        return self.store.upsert_artifact(record, replace=replace)

    def get_artifact(self, name: str) -> ArtifactRecord | None:
        return self.store.get_artifact(name)

    def list_artifacts(self, kind: str | None = None, task_id: str | None = None) -> list[ArtifactRecord]:
        return self.store.list_artifacts(kind=kind, task_id=task_id)

    def get_task_model(self, task_id: str) -> ArtifactRecord | None:
        return self.store.get_task_model(task_id)

    def delete_artifact(self, name: str) -> None:
        self.store.delete_artifact(name)

    def create_job(self, task_id: str, **fields: Any) -> JobRecord:
        return self.store.create_job(task_id, **fields)

    def update_job(self, task_id: str, *, only_if: Collection[str] | None = None, owner: str | None = None,
                   **fields: Any) -> JobRecord | None:
        return self.store.update_job(task_id, only_if=only_if, owner=owner, **fields)

    def report_progress(self, task_id: str, event: dict[str, Any]) -> bool:
        return self.store.report_progress(task_id, event)

    def rewind_progress(self, task_id: str, step: int) -> JobRecord:
        return self.store.rewind_progress(task_id, step)

    def get_job(self, task_id: str) -> JobRecord | None:
        return self.store.get_job(task_id)

    def list_jobs(self, status: str | Collection[str] | None = None) -> list[JobRecord]:
        return self.store.list_jobs(status)

    def delete_job(self, task_id: str, *, with_artifacts: bool = False, force: bool = False) -> None:
        self.store.delete_job(task_id, with_artifacts=with_artifacts, force=force)

    def set_active_model(self, name_or_path: str | None) -> None:
        self.store.set_active_model(name_or_path)

    def record_switch(self, action: str, to_model: str, **fields: Any) -> SwitchRecord:
        return self.store.record_switch(action, to_model, **fields)

    def list_switches(self, limit: int = 50) -> list[SwitchRecord]:
        return self.store.list_switches(limit)

    # The queue and the task folders (on the head node's disk, where this actor runs).

    def acquire_slot(self, task_id: str, need: dict[str, float], limit: int | None = None,
                     driver: str | None = None) -> dict[str, Any]:
        """A job's driver asks to start: granted (status preparing) or still queued, and why."""
        return self.queue.acquire(self.store, task_id, need, limit, driver)

    def write_config(self, task_id: str, text: str) -> str:
        return taskfiles.write_config(self._paths(task_id), text)

    def append_log(self, task_id: str, text: str) -> None:
        """Lines of train.log from a worker on another node, into the task's log here."""
        taskfiles.append_log(self._paths(task_id).train_log, text)

    def read_log(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        """Whole lines of the task's train.log from byte `offset`, and the offset after them."""
        return taskfiles.read_chunk(self._paths(task_id).train_log, offset)

    def tail_log(self, task_id: str, lines: int | None = None) -> str:
        return taskfiles.read_tail(self._paths(task_id).train_log, lines)

    def checkpoint_step(self, task_id: str) -> int | None:
        return taskfiles.checkpoint_step(self._paths(task_id))

    def delete_task(self, task_id: str) -> bool:
        """Forget a finished job and its artifacts, then remove its folder; refused (InUseError)
        while it runs or while one of its models is the active one. True if files were removed."""
        job = self.store.get_job(task_id)
        if job is not None and job["status"] not in TERMINAL:
            raise InUseError(f"job {task_id!r} is {job['status']}; cancel it first: sage finetune cancel {task_id}")
        paths = self._paths(task_id)
        if job is not None:
            self.store.delete_job(task_id, with_artifacts=True)
        else:  # files and artifacts of a task run before the registry knew it
            for artifact in self.store.list_artifacts(task_id=task_id):
                self.store.delete_artifact(artifact["name"])
        return taskfiles.remove_task_dir(paths)

    def _paths(self, task_id: str):
        return taskfiles.task_paths(self.sage_home, task_id)

    def get_active_model(self) -> str | None:
        return self.store.get_active_model()

    def set_serving(self, state: dict[str, Any]) -> None:
        self.store.set_serving(state)

    def get_serving(self) -> dict[str, Any] | None:
        return self.store.get_serving()


def get_registry(sage_home: str | os.PathLike | None = None, *, name: str = ACTOR_NAME,
                 namespace: str = NAMESPACE, timeout_s: float = 30.0):
    """A handle to the cluster's registry actor, created (discovery included) if there is none.

    Joins Ray first when this process is not connected (RAY_ADDRESS, else a new local
    cluster). Raises RegistryMismatchError when the running registry serves another SAGE_HOME.
    """
    import ray
    from ray.exceptions import RayActorError

    from sage_ray import cluster

    cluster.connect()
    home = str(Path(sage_home or default_sage_home()).expanduser().absolute())
    actor_class = ray.remote(RegistryActor).options(
        name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
        num_cpus=0,  # bookkeeping only: never take a CPU a training worker or replica needs
        # on the head node, whose disk holds SAGE_HOME, and outside any caller's placement group
        resources={"node:__internal_head__": 0.001}, scheduling_strategy="DEFAULT",
        max_restarts=-1, max_task_retries=-1,
        # one call at a time: a caller's calls then run in the order sent (threaded actors do
        # not keep it), so one worker's progress reports never overtake each other
        max_concurrency=1,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        handle = actor_class.remote(home)
        try:
            info = ray.get(handle.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
            break
        except RayActorError as err:
            # A killed actor keeps its name for a moment: ask again for a live one.
            if getattr(err, "actor_init_failed", False) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if info["sage_home"] != home:
        raise RegistryMismatchError(
            f"the registry actor {name!r} in namespace {namespace!r} serves SAGE_HOME={info['sage_home']}, "
            f"not {home}; use that SAGE_HOME, or replace the actor: "
            f"ray.kill(ray.get_actor({name!r}, namespace={namespace!r})) (its records stay in its registry.db)")
    return handle


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # the class is also used in-process, without Ray
        return None
