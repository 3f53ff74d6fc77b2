"""Lending the chat model's GPU to a fine-tune (Studio gpu_policy "release"), both sides.

The job's side (`borrow_gpu` / `return_gpu`) asks the LLM deployment to leave its GPU and to
take it back. The replica's side (`GpuLoans`) keeps which jobs hold it and puts the engines to
sleep and wakes them only through the engine protocol (`sleep` / `wake` / `serves_asleep`):
a transformers engine keeps answering from the CPU, an engine that cannot serve asleep
refuses requests until the loan ends. The queue's view of the hold lives in sage_ray.placement.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

from sage_ray.registry.status import TERMINAL
from sage_ray.serve.engines.base import Engine
from sage_ray.serve.settings import LLM_DEPLOYMENT

log = logging.getLogger("ray.serve")


def borrow_gpu(hold: dict[str, Any], task_id: str, timeout_s: float = 600) -> None:
    """Ask the chat model's deployment to leave its GPU to `task_id` (LLMServer.release_gpu)."""
    _llm_handle(hold).release_gpu.remote(task_id).result(timeout_s=timeout_s)


def return_gpu(hold: dict[str, Any], task_id: str, timeout_s: float = 600) -> None:
    """Give the GPU back to the chat model; it wakes there once no job borrows it any more."""
    _llm_handle(hold).reclaim_gpu.remote(task_id).result(timeout_s=timeout_s)


def _llm_handle(hold: dict[str, Any]):
    from ray import serve

    return serve.get_deployment_handle(LLM_DEPLOYMENT, app_name=hold["app"])


class GpuLoans:
    """The fine-tunes (task ids) this replica's GPU is lent to; its engines sleep while any is."""

    def __init__(self) -> None:
        self.lent_to: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.lent_to)

    def silences(self, engine: Engine) -> bool:
        """True when `engine` cannot answer now: it sleeps for a loan and cannot serve asleep."""
        return bool(self.lent_to) and not engine.serves_asleep

    async def lend(self, task_id: str, engines: Iterable[Engine]) -> None:
        """Add a borrower; the first one puts every engine to sleep. Idempotent."""
        first = not self.lent_to
        self.lent_to.add(task_id)
        if first:
            await asyncio.gather(*(engine.sleep() for engine in engines))
        log.info("LLMServer: GPU lent to %s", sorted(self.lent_to))

    async def take_back(self, task_id: str, engines: Iterable[Engine]) -> bool:
        """Drop a borrower; True when it was the last, and the engines are awake again."""
        if task_id not in self.lent_to:
            return False
        self.lent_to.discard(task_id)
        log.info("LLMServer: GPU back from %s (still lent to %s)", task_id, sorted(self.lent_to) or "none")
        if self.lent_to:
            return False
        await asyncio.gather(*(engine.wake() for engine in engines))
        return True

    async def inherit(self, registry, node_id: str | None, app: str | None) -> None:
        """A replica started while its node's GPU is lent (the previous one died mid-job) keeps
        the loan: loading onto the GPU under a running fine-tune would run both out of memory."""
        try:
            serving = await asyncio.to_thread(registry.get_serving) or {}
        except Exception:  # no registry yet: nothing can have been lent
            return
        gpu = serving.get("gpu") or {}
        if gpu.get("node_id") != node_id or gpu.get("app") != app:
            return
        for task_id in gpu.get("lent_to") or []:
            job = await asyncio.to_thread(registry.get_job, task_id)
            if job is not None and job["status"] not in TERMINAL:
                self.lent_to.add(task_id)
        if self.lent_to:
            log.info("LLMServer: starting with the GPU still lent to %s", sorted(self.lent_to))

    async def ended(self, registry) -> list[str]:
        """Borrowers whose job ended without handing the GPU back (their driver died)."""
        gone = []
        for task_id in sorted(self.lent_to):
            job = await asyncio.to_thread(registry.get_job, task_id)
            if job is None or job["status"] in TERMINAL:
                log.warning("LLMServer: fine-tune %s ended without returning the GPU; taking it back", task_id)
                gone.append(task_id)
        return gone
