"""The fine-tune queue: which waiting job may start now.

Every job's driver asks the registry actor for a slot before it asks Ray for training workers
(`python -m sage_ray.train` and in-process `finetune()` alike). The actor answers one call at
a time, so "check the queue, check the free resources, mark the job preparing" is atomic: two
drivers never both take the last free CPUs. A slot is granted to the oldest live waiting job
when fewer than the limit of jobs run (SAGE_MAX_CONCURRENT_JOBS) and the cluster has the
CPUs/GPUs its workers need, net of what jobs granted a moment ago have not placed yet. When
the chat model holds a GPU under a gpu_policy (sage_ray.placement), a job that could only run
on that GPU waits ("wait") or is granted with the GPU to borrow ("release"). On an autoscaling
cluster what the autoscaler can still start counts as well (sage_ray.placement.autoscaler_ceiling):
a job that fits once a node of its group is up starts, and its workers' pending request is what
makes the autoscaler start that node.

Drivers ask about once a second while they wait. A queued job whose driver stopped asking (it
died, or the cluster restarted under it) stops holding up the jobs behind it after a grace
period; a running job whose driver is dead stops counting toward the limit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from sage_ray.placement import autoscaler_ceiling, gpu_conflict, per_worker
from sage_ray.registry.status import ACTIVE, RUNNING, JobStatus
from sage_ray.registry.store import RegistryStore

WAITING = "waiting for resources"
LIMIT_ENV = "SAGE_MAX_CONCURRENT_JOBS"
POLL_STALE_S = 5.0  # a waiting driver asks every ~1 s: 5 s of silence means it is gone
STARTUP_GRACE_S = 60.0  # a queued job whose driver has not asked yet may still be starting up
EPSILON = 1e-6


def concurrency_limit(environ: dict[str, str] | None = None) -> int | None:
    """SAGE_MAX_CONCURRENT_JOBS as a positive int, or None (no limit beyond resources)."""
    raw = (environ if environ is not None else os.environ).get(LIMIT_ENV, "").strip()
    if not raw:
        return None
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{LIMIT_ENV}={raw!r}: give a positive whole number of jobs, or unset it for no limit")
    return limit


def worker_demand(config: dict[str, Any] | None, extra: dict[str, float] | None = None) -> dict[str, float]:
    """What a job's training workers ask Ray for, from its resolved config and the resources each
    worker adds (SAGE_TRAIN_RESOURCES, see sage_ray.placement)."""
    config = config or {}
    workers = int(config.get("num_workers") or 1)
    one = per_worker(float(config.get("cpus_per_worker") or 1), bool(config.get("use_gpu")), extra)
    return {name: amount * workers for name, amount in one.items() if amount > 0}


def _amount(value: float) -> str:
    return f"{value:g}"


@dataclass
class Decision:
    granted: bool
    detail: str | None = None
    borrow: dict[str, Any] | None = None  # the chat model's hold, when the job starts on its GPU


def decide(need: dict[str, float], *, ahead: int, running: int, limit: int | None,
           available: dict[str, float], claimed: dict[str, float], total: dict[str, float],
           hold: dict[str, Any] | None = None, per_node: dict[str, dict[str, float]] | None = None,
           ceiling: dict[str, float] | None = None) -> Decision:
    """May a job needing `need` start now? `ahead`: live jobs queued before it; `claimed`: what
    granted jobs will take but Ray does not show as used yet; `hold`: what the chat model holds
    and its gpu_policy; `per_node`: free resources by node id; `ceiling`: what the cluster's
    autoscaler can grow to (None: no autoscaler, the nodes there are all there will be)."""
    ceiling = ceiling or {}
    for resource, amount in need.items():
        most = max(total.get(resource, 0.0), ceiling.get(resource, 0.0))
        if amount > most + EPSILON:
            scaled = f", and its autoscaler can reach {_amount(most)}" if resource in ceiling else ""
            return Decision(False, f"{WAITING}: needs {_amount(amount)} {resource}, the cluster has "
                                   f"{_amount(total.get(resource, 0.0))} in all{scaled} (add nodes, or lower "
                                   "num_workers / cpus_per_worker; cancel it otherwise)")
    if ahead:
        return Decision(False, f"{WAITING}: {ahead} job(s) ahead in the queue")
    if limit is not None and running >= limit:
        return Decision(False, f"{WAITING}: {running} of {limit} concurrent jobs running ({LIMIT_ENV})")
    action, why = gpu_conflict(need, hold, per_node or {})
    if action == "wait":
        return Decision(False, why)
    free = {resource: available.get(resource, 0.0) - claimed.get(resource, 0.0) for resource in need}
    short = {resource: amount for resource, amount in need.items() if amount > free[resource] + EPSILON}
    # What the autoscaler can still add (nodes it has not started): a job that fits once they
    # are there starts now, so that its workers' request is what makes the autoscaler add them.
    growth = {resource: max(0.0, ceiling.get(resource, 0.0) - total.get(resource, 0.0)) for resource in short}
    if short and all(amount <= free[r] + growth[r] + EPSILON for r, amount in short.items()):
        return Decision(True, "starting: the autoscaler adds nodes for " + ", ".join(
            f"{_amount(amount)} {resource}" for resource, amount in short.items()))
    if short:
        return Decision(False, f"{WAITING}: " + "; ".join(
            f"needs {_amount(amount)} {resource}, {_amount(max(0.0, free[resource]))} free"
            for resource, amount in short.items()))
    return Decision(True, why, hold) if action == "borrow" else Decision(True)


def _epoch(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


class SlotQueue:
    """The registry actor's queue keeper: who asked when, and which driver runs which job.

    This memory is lost when the actor restarts; live drivers re-announce themselves within a
    second, and until then every queued job counts as live (the grace period)."""

    def __init__(self, cluster_state: Callable[[], tuple[dict, dict, set[str]]],
                 node_state: Callable[[], dict[str, dict]] | None = None,
                 actor_alive: Callable[[str], bool] | None = None,
                 ceiling: Callable[[], dict[str, float] | None] | None = None):
        # cluster_state() -> (available resources, total resources, hex ids of live drivers);
        # node_state() -> free resources by node id; actor_alive(hex id) -> is that actor alive;
        # ceiling() -> what the autoscaler can grow the cluster to, None without one
        self.cluster_state = cluster_state
        self.node_state = node_state or ray_node_state
        self.actor_alive = actor_alive or ray_actor_alive
        self.ceiling = ceiling or autoscaler_ceiling
        self.started = time.time()
        self.last_asked: dict[str, float] = {}
        self.drivers: dict[str, str] = {}

    def _live_waiting(self, job: dict[str, Any], now: float) -> bool:
        asked = self.last_asked.get(job["task_id"])
        if asked is not None:
            return now - asked < POLL_STALE_S
        return now - max(_epoch(job.get("queued_at") or job["created_at"]), self.started) < STARTUP_GRACE_S

    def acquire(self, store: RegistryStore, task_id: str, need: dict[str, float], limit: int | None,
                driver: str | None) -> dict[str, Any]:
        """Grant `task_id` a slot (its status becomes preparing) or say why it waits."""
        now = time.time()
        job = store.get_job(task_id)
        if job is None:
            return {"granted": False, "status": None, "detail": "no such job"}
        if driver:
            self.drivers[task_id] = driver
        if job["status"] != JobStatus.QUEUED:  # cancelled while waiting, or a replayed call that was granted
            return {"granted": job["status"] in RUNNING, "status": job["status"], "detail": job["status_detail"]}
        self.last_asked[task_id] = now
        available, total, live_drivers = self.cluster_state()
        ceiling = self.ceiling()
        jobs = store.list_jobs(ACTIVE)
        order = (job.get("queued_at") or job["created_at"], job["created_at"])
        ahead = sum(1 for other in jobs if other["status"] == JobStatus.QUEUED and other["task_id"] != task_id
                    and (other.get("queued_at") or other["created_at"], other["created_at"]) < order
                    and self._live_waiting(other, now))
        running = [other for other in jobs if other["status"] in RUNNING
                   and self.drivers.get(other["task_id"], "live") in live_drivers | {"live"}]
        claimed: dict[str, float] = {}
        for other in running:
            if other["status"] == JobStatus.PREPARING:  # granted, workers maybe not placed yet
                for resource, amount in worker_demand(other.get("config")).items():
                    claimed[resource] = claimed.get(resource, 0.0) + amount
        hold = self._chat_hold(store)
        decision = decide(need, ahead=ahead, running=len(running), limit=limit, available=available,
                          claimed=claimed, total=total, hold=hold, per_node=self.node_state() if hold else None,
                          ceiling=ceiling)
        if decision.granted:
            store.update_job(task_id, status=JobStatus.PREPARING, status_detail=decision.detail, only_if=(JobStatus.QUEUED,))
            self.last_asked.pop(task_id, None)
            return {"granted": True, "status": JobStatus.PREPARING, "detail": decision.detail, "borrow": decision.borrow}
        if decision.detail != job["status_detail"]:
            store.update_job(task_id, status_detail=decision.detail, only_if=(JobStatus.QUEUED,))
        return {"granted": False, "status": JobStatus.QUEUED, "detail": decision.detail}

    def _chat_hold(self, store: RegistryStore) -> dict[str, Any] | None:
        """What the chat model holds under a gpu_policy, from its last serving record; None when
        there is no policy or the replica that recorded it is gone (a stopped Studio holds nothing)."""
        hold = (store.get_serving() or {}).get("gpu")
        if not hold or hold.get("policy") in (None, "none"):
            return None
        return hold if self.actor_alive(hold.get("actor_id") or "") else None


def ray_cluster_state() -> tuple[dict, dict, set[str]]:
    """Free and total resources, and the drivers (Ray job ids) still alive, as Ray sees them."""
    import ray
    from ray._private import state

    live = {job["JobID"] for job in state.jobs() if not job.get("IsDead")}
    return ray.available_resources(), ray.cluster_resources(), live


def ray_node_state() -> dict[str, dict]:
    """Free resources of each live node, by node id (hex)."""
    from ray._private import state

    return state.available_resources_per_node()


def ray_actor_alive(actor_id: str) -> bool:
    """Whether the actor with this hex id is alive (a replica restarting counts as not alive)."""
    from ray._private import state

    if not actor_id:
        return False
    try:
        info = state.actors(actor_id=actor_id)
    except Exception:  # an id from an earlier cluster, unknown to this GCS
        return False
    return bool(info) and info.get("State") == "ALIVE"
