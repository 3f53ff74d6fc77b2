"""Fine-tune jobs on Ray Jobs: submit, follow, cancel, resume, delete.

A job is `python -m sage_ray.train <task dir>/config.yaml --name ID` run by Ray Jobs with the
task id as its submission id (a resumed run gets `ID-resumeN`). The registry actor holds the
record; the driver keeps it current (queue, progress, errors) and this module reconciles it
with what Ray knows, so a driver that died without a word (killed, cluster restarted) still
ends up failed or cancelled. Every call works from a driver connected with `ray.init` and from
inside an actor or Serve replica; the task folder's files are read and written by the registry
actor, on the head node, never from this process's disk.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from sage_ray import cluster, storage
from sage_ray import env as sage_env
from sage_ray.config import ConfigError, TrainConfig, dump_train_config
from sage_ray import ray_jobs
from sage_ray.errors import JobError, JobNotFoundError, JobStateError, JobTimeoutError
from sage_ray.ray_jobs import GONE
from sage_ray.registry.client import RegistryClient
from sage_ray.registry.queue import concurrency_limit
from sage_ray.registry import taskfiles
from sage_ray.registry.status import ACTIVE, RESUMABLE, TERMINAL, JobStatus
from sage_ray.registry.taskfiles import task_paths
from sage_ray.train import publish

log = logging.getLogger(__name__)


dashboard_url = ray_jobs.dashboard_url  # the cluster's dashboard, where its Ray jobs show


class _JobsRegistry(RegistryClient):
    """The registry with its errors as job errors (what the CLI, the SDK and the API report)."""

    def _call(self, method, *args: Any, **kwargs: Any) -> Any:
        from sage_ray.registry import AlreadyExistsError, InUseError, NotFoundError

        try:
            return super()._call(method, *args, **kwargs)
        except NotFoundError as err:
            raise JobNotFoundError(str(err)) from None
        except (InUseError, AlreadyExistsError) as err:
            raise JobStateError(str(err)) from None


_registries: dict[str, _JobsRegistry] = {}


def _registry() -> _JobsRegistry:
    """The connected cluster's registry (joined first: RAY_ADDRESS, else the local one)."""
    import ray

    cluster.connect(None, log_to_driver=False)
    from sage_ray.paths import sage_home

    key = f"{ray.get_runtime_context().gcs_address} {sage_home()}"
    if key not in _registries:
        _registries[key] = _JobsRegistry()
    return _registries[key]


def prepare(cfg: TrainConfig) -> TrainConfig:
    """Check what can be checked before a job exists: config, task id, dataset, queue setting.
    Returns the config with its task id and absolute dataset path; raises ConfigError / DatasetError."""
    from sage_ray.data import load_dataset
    from sage_ray.data.split import resolve_validation

    try:
        cfg = name_task(cfg)
        concurrency_limit()
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    records = len(load_dataset(cfg.data, method=cfg.method))
    if cfg.val_data:
        load_dataset(cfg.val_data, method=cfg.method)
    resolve_validation(cfg, records)  # refuses an eval_steps that would have nothing to evaluate
    return cfg


def submit(cfg: TrainConfig, *, address: str | None = None) -> str:
    """Validate `cfg`, record the job (queued) and hand it to Ray Jobs; return its task id.

    ConfigError / DatasetError come before anything is recorded or submitted."""
    cfg = prepare(cfg)
    cluster.connect(address, log_to_driver=False)
    home = Path(_registry().info()["sage_home"])
    paths = task_paths(home, cfg.name)
    _registry().create_job(cfg.name, config=cfg.model_dump(mode="json"), status=JobStatus.QUEUED,
          status_detail="submitted: waiting for the Ray job to start", log_path=str(paths.train_log))
    header = (f"sage-ray fine-tune {cfg.name}; run it by hand with:\n"
              f"ray job submit -- python -m sage_ray.train <this file> --name {cfg.name}")
    config_path = _registry().write_config(cfg.name, dump_train_config(cfg, header=header))
    try:
        _start_ray_job(cfg.name, config_path, str(home), submission_id=cfg.name)
    except JobError:
        _registry().delete_job(cfg.name, force=True)  # nothing ran: leave the task id free
        raise
    return cfg.name


def _start_ray_job(task_id: str, config_path: str, home: str, *, submission_id: str) -> None:
    env = sage_env.forwarded("jobs")  # the submitter's settings the job must share
    env["SAGE_HOME"] = home  # the registry's home, which the job's records and files belong to
    ray_jobs.submit(task_id, config_path, env, submission_id=submission_id)
    _registry().update_job(task_id, ray_job_id=submission_id)


def _reconcile(job: dict, info: Any) -> dict:
    """Bring an active record in line with a Ray job that ended without the driver saying so."""
    if job["status"] in TERMINAL or info is None:
        return job
    task_id = job["task_id"]
    ray_status = None if info == GONE else getattr(info.status, "value", str(info.status))
    if info == GONE:
        fields = {"status": JobStatus.FAILED, "error": f"its Ray job {job['ray_job_id']} is gone (was the cluster "
                                               f"restarted?); continue it: sage finetune resume {task_id}"}
    elif ray_status == "FAILED":
        fields = {"status": JobStatus.FAILED, "error": f"the Ray job failed: {info.message or 'no message'}; "
                                               f"its log: sage finetune logs {task_id}"}
    elif ray_status == "STOPPED":
        fields = {"status": JobStatus.CANCELLED, "status_detail": "stopped with `ray job stop`"}
    else:
        if ray_status == "PENDING" and job["status"] == JobStatus.QUEUED and not job.get("status_detail"):
            return {**job, "status_detail": "waiting for the Ray job to start"}
        return job
    return _registry().update_job(task_id, only_if=ACTIVE, **fields) or _registry().get_job(task_id)


def get(task_id: str) -> dict:
    """The job's record, reconciled with its live Ray job."""
    job = _registry().get_job(task_id)
    if job is None:
        raise JobNotFoundError(f"no fine-tune job {task_id!r}; `sage finetune list` shows them")
    if job["status"] in TERMINAL or not job.get("ray_job_id"):
        return job
    return _reconcile(job, ray_jobs.info(job["ray_job_id"]))


def list_jobs() -> list[dict]:
    """Every job, newest first, each reconciled with its Ray job (one Ray Jobs call in all)."""
    records = _registry().list_jobs()
    if not any(job["status"] not in TERMINAL and job.get("ray_job_id") for job in records):
        return records
    try:
        known = ray_jobs.all_info()
    except Exception as err:
        log.warning("could not list Ray jobs: %s", err)
        return records
    return [_reconcile(job, known.get(job["ray_job_id"], GONE)) if job.get("ray_job_id") else job
            for job in records]


def cancel(task_id: str, timeout_s: float = 10) -> dict:
    """Stop a queued or running job: its record says cancelled and, within `timeout_s`, neither
    its Ray job nor any of its workers is left."""
    deadline = time.monotonic() + timeout_s
    job = get(task_id)
    if job["status"] == JobStatus.CANCELLED:
        return job
    if job["status"] in TERMINAL:
        raise JobStateError(f"job {task_id!r} already {job['status']}: nothing to cancel "
                            f"(sage finetune delete {task_id} removes it)")
    if not job.get("ray_job_id") and job["status"] != JobStatus.QUEUED:
        raise JobStateError(f"job {task_id!r} runs in its own process (finetune() or quickstart), not as a Ray "
                            "job: stop that process (Ctrl-C)")
    done = _registry().update_job(task_id, status=JobStatus.CANCELLED, status_detail="cancelled by the user", only_if=ACTIVE)
    if done is None:  # it finished meanwhile
        return cancel(task_id, max(0.0, deadline - time.monotonic()))
    if job.get("ray_job_id"):
        ray_jobs.stop(job["ray_job_id"], deadline, timeout_s)
    return _registry().get_job(task_id)


def delete(task_id: str) -> None:
    """Remove a finished job: its record, its artifacts' records, its task folder, its Ray jobs."""
    job = get(task_id)
    if job["status"] not in TERMINAL:
        raise JobStateError(f"job {task_id!r} is {job['status']}; cancel it first: sage finetune cancel {task_id}")
    _registry().delete_task(task_id)
    publish.forget(task_id)  # its shared copy (SAGE_STORAGE), if any
    ray_jobs.forget(_submission_ids(job))  # frees the ids, so a new job may take the name


def _submission_ids(job: dict) -> list[str]:
    current = job.get("ray_job_id") or job["task_id"]
    stem, _, number = current.rpartition("-resume")
    resumes = int(number) if stem == job["task_id"] and number.isdigit() else 0
    return [job["task_id"], *(f"{job['task_id']}-resume{n}" for n in range(1, resumes + 1)),
            *([current] if current.startswith("raysubmit_") else [])]


def resume(task_id: str) -> str:
    """Continue a failed or cancelled job from its last checkpoint (Ray Train restores it;
    progress is set back to that step so it stays monotonic from there). Returns the task id."""
    job = get(task_id)
    if job["status"] not in RESUMABLE:
        hint = "nothing to resume" if job["status"] == JobStatus.COMPLETED else "it is still running"
        raise JobStateError(f"job {task_id!r} is {job['status']}: {hint}; only failed or cancelled jobs resume")
    if not job.get("config"):
        raise JobStateError(f"job {task_id!r} has no config in the registry; start it again with sage finetune start")
    home = _registry().info()["sage_home"]
    cfg = TrainConfig.model_validate({**job["config"], "name": task_id})
    config_path = _registry().write_config(task_id, dump_train_config(cfg, header=f"sage-ray fine-tune {task_id} (resumed)"))
    shared = storage.task_uri(task_id)  # with SAGE_STORAGE the checkpoints are there, not on the head
    step = (taskfiles.checkpoint_step_at(storage.join(shared, "checkpoints")) if shared
            else _registry().checkpoint_step(task_id)) or 0
    submission_id = _next_submission_id(job)
    queued = _registry().update_job(task_id, status=JobStatus.QUEUED, ray_job_id=None, only_if=RESUMABLE,
                   status_detail=f"resuming from step {step}" if step else "restarting: no checkpoint was saved")
    if queued is None:
        raise JobStateError(f"job {task_id!r} changed state meanwhile; look again: sage finetune status {task_id}")
    _registry().rewind_progress(task_id, step)
    try:
        _start_ray_job(task_id, config_path, home, submission_id=submission_id)
    except JobError as err:
        _registry().update_job(task_id, status=JobStatus.FAILED, error=str(err), only_if=(JobStatus.QUEUED,))
        raise
    return task_id


def _next_submission_id(job: dict) -> str:
    resumes = [s for s in _submission_ids(job) if s.startswith(f"{job['task_id']}-resume")]
    return f"{job['task_id']}-resume{len(resumes) + 1}"


def logs(task_id: str, tail: int | None = None) -> str:
    """The job's train.log, or its last `tail` lines."""
    get(task_id)
    return _registry().tail_log(task_id, tail)


def follow_logs(task_id: str, poll_s: float = 0.5) -> Iterator[str]:
    """The log's lines (without newlines) as they are written; ends once the job has ended and
    every line is out."""
    offset = 0
    while True:
        finished = get(task_id)["status"] in TERMINAL
        text, offset = _registry().read_log(task_id, offset)
        yield from text.splitlines()
        if finished and not text:
            return
        if not text:
            time.sleep(poll_s)


def wait(task_id: str, timeout_s: float | None = None,
         on_progress: Callable[[dict], None] | None = None, poll_s: float = 0.5) -> dict:
    """Wait until the job ends and return its record; `on_progress(record)` on every change."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen = None
    while True:
        job = get(task_id)
        state = tuple(job.get(k) for k in ("status", "status_detail", "step", "progress", "loss", "error"))
        if on_progress is not None and state != seen:
            on_progress(job)
        seen = state
        if job["status"] in TERMINAL:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimeoutError(f"job {task_id!r} is still {job['status']} after {timeout_s:g}s; it keeps "
                                  f"running (sage finetune cancel {task_id} stops it)")
        time.sleep(poll_s)


def model_of(task_id: str) -> dict | None:
    """The registry's model of a completed job: its merged model if any, else its adapter."""
    return _registry().get_task_model(task_id)


# ---- the other ways into training: naming, planning, merging ---------------------------
def name_task(cfg: TrainConfig) -> TrainConfig:
    """The config with its task id and absolute dataset path (ConfigError for a finished task's id)."""
    from sage_ray.train.trainer import name_task as name

    return name(cfg)[0]


def plan(cfg: TrainConfig):
    """(effective config, device, memory estimate) for `cfg` before anything starts: the preset
    filled in for the device a worker would get, checked against its memory (DoesNotFitError)."""
    from sage_ray.models import config_folder
    from sage_ray.train.trainer import resolve_resources

    return resolve_resources(cfg, config_folder(cfg.model))  # a Hub model: its config.json only


MERGE_CPUS = 1.0  # a merge loads the base in full precision: never inside a process with no CPU of its own


def merge(task_id: str) -> dict:
    """Merge a completed task's adapter into its base (`<task>/merged_model/`, shared with
    SAGE_STORAGE), register the merged model and return it. Runs as a Ray task with a CPU
    reserved, on the head node where the task folders are; the caller (CLI, Studio ingress)
    only waits."""
    import ray

    registry = _registry()
    home = registry.info()["sage_home"]
    task = ray.remote(_merge_on_node).options(
        num_cpus=MERGE_CPUS, resources={"node:__internal_head__": 0.001},
        runtime_env={"env_vars": storage.forwarded_env()} if storage.forwarded_env() else None)
    outcome = ray.get(task.remote(task_id, home))
    if "error" in outcome:
        error = {"not found": JobNotFoundError, "invalid": ConfigError}[outcome["error"]]
        raise error(outcome["message"])
    for record in outcome["artifacts"]:
        registry.upsert_artifact(record)
    registry.discover()  # the adapter's name changes to <task>-lora next to the merged model
    return registry.get_task_model(task_id)


def _merge_on_node(task_id: str, home: str) -> dict:
    from sage_ray.paths import TaskPaths
    from sage_ray.registry import describe_task
    from sage_ray.train.callbacks import write_log
    from sage_ray.train.meta import read_meta

    try:
        paths = TaskPaths(task_id, root=Path(home) / "studio_finetune")
        meta = read_meta(paths)
    except FileNotFoundError:
        return {"error": "not found", "message": f"task {task_id!r} has no completed fine-tune in {paths.dir} "
                                                 "(finetune_meta.json is missing); `sage finetune list` shows them"}
    except ValueError as err:  # a task id that cannot be one
        return {"error": "invalid", "message": str(err)}
    if not paths.merged.is_dir():
        publish.merge_task(paths, meta["base_model_path"])
        write_log(paths.train_log, f"merged: {paths.merged}")
    return {"artifacts": describe_task(paths.dir)}
