"""The Ray Jobs side of a fine-tune: submit `python -m sage_ray.train` as a Ray job, ask Ray
about it, stop it until none of its processes is left, forget it. sage_ray.jobs keeps the
registry's side and is what callers use."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from typing import Any

from sage_ray import cluster
from sage_ray.errors import JobError

log = logging.getLogger(__name__)
GONE = "gone"  # what info() answers for a submission Ray does not know
AGENT_WAIT_S = 60.0
_clients: dict[str, Any] = {}


def dashboard_url() -> str:
    """The dashboard URL (Ray Jobs API) of the connected cluster."""
    return cluster.dashboard_url()


def client():
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url()
    if url not in _clients:
        _clients[url] = JobSubmissionClient(url)
    return _clients[url]


def _python() -> str:
    """This interpreter when the job runs on this machine or this process is in the cluster
    (same install); `python` on the cluster's PATH otherwise."""
    import ray._private.worker as worker

    if cluster.is_loopback(dashboard_url()) or worker.global_worker.mode == worker.WORKER_MODE:
        return sys.executable
    return "python"


def submit(task_id: str, config_path: str, env: dict[str, str], *, submission_id: str) -> None:
    """Start the fine-tune's driver as Ray job `submission_id` with `env` in its runtime_env."""
    entrypoint = " ".join(shlex.quote(part) for part in (
        _python(), "-m", "sage_ray.train", config_path, "--name", task_id))
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client().submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                runtime_env={"env_vars": env}, metadata={"sage_task_id": task_id})
            return
        except Exception as err:  # the Jobs API answers HTTP errors as RuntimeError, and more
            # a cluster that has just started has no job agent for a few seconds
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise JobError(f"Ray Jobs did not accept job {task_id!r}: {err}\n"
                           f"Check the cluster's dashboard at {dashboard_url()}") from err


def info(submission_id: str):
    """Ray's JobDetails for a submission, GONE if Ray does not know it, None if unreachable."""
    try:
        return client().get_job_info(submission_id)
    except Exception as err:  # HTTP errors come as RuntimeError, an unreachable dashboard as others
        if "does not exist" in str(err) or "404" in str(err):
            return GONE
        log.warning("could not ask Ray Jobs about %s (the record is shown as it is): %s", submission_id, err)
        return None


def all_info() -> dict[str, Any]:
    """Every submission Ray knows, by id (one call)."""
    return {details.submission_id: details for details in client().list_jobs()}


def stop(submission_id: str, deadline: float, timeout_s: float) -> None:
    """`ray job stop`, then wait until Ray says it ended and none of its actors lives."""
    try:
        client().stop_job(submission_id)
    except RuntimeError as err:
        if "does not exist" in str(err):
            return
        raise JobError(f"could not stop Ray job {submission_id}: {err}") from err
    left: list[str] = []
    while True:
        details = info(submission_id)
        if details == GONE:
            return
        if details is not None and details.status.is_terminal():
            left = live_actors(details.job_id)
            if not left:
                return
        if time.monotonic() > deadline:
            raise JobError(f"Ray job {submission_id} did not stop within {timeout_s:g}s (status "
                           f"{getattr(details, 'status', '?')}, actors left: {left or 'none'}); stop it with "
                           f"`ray job stop {submission_id}`, or end those actors with ray.kill")
        time.sleep(0.2)


def live_actors(job_hex: str | None) -> list[str]:
    """The job's actors still alive (its Ray Train controller and workers), as class names;
    detached ones (the registry, when this job happened to create it) outlive jobs by design."""
    if not job_hex:
        return []
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url(), filters=[("job_id", "=", job_hex), ("state", "=", "ALIVE")],
                         detail=True, raise_on_missing_output=False)
    return [actor.class_name for actor in actors if not actor.is_detached]


def forget(submission_ids: list[str]) -> None:
    """Delete Ray's records of these submissions, which frees their ids for new jobs."""
    for submission_id in submission_ids:
        try:
            client().delete_job(submission_id)
        except Exception:
            pass  # Ray never had it, or has forgotten it (cluster restarted)
