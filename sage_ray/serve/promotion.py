"""Knowing a fine-tune is better before serving it: compare, gated switch, rollback.

Every change of the served model is recorded in the registry by StudioService.switch_model
(who, when, from, to, and a gated switch's figures); rollback returns to the model the latest
change replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from sage_ray import comparison
from sage_ray.serve.canary import Canary
from sage_ray.serve.resolve import spec_of, within_roots
from sage_ray.serve.service import ServiceError, StudioService, user_error


class Promotion:
    """compare / switch / rollback over a StudioService (blocking: call from threads)."""

    def __init__(self, service: StudioService):
        self.service = service
        self.registry = service.registry

    def _spec(self, ref: str):
        try:
            return spec_of(self.registry.artifact(ref), fetch=False, roots=self.service.settings.roots())
        except Exception as err:
            raise user_error(err) from None

    def served(self) -> str:
        """What is served now (or declared to be, or the Studio's default model)."""
        return self.service.served_ref()

    def compare(self, task_id: str, against: str | None = None, prompts: str | None = None,
                limit: int = comparison.MAX_EXAMPLES) -> dict[str, Any]:
        """The task's model and `against` (default: the served model) on the task's held-out
        records, or on the records of `prompts` (a dataset file inside the Studio's folders)."""
        return comparison.result_of(self.compare_events(task_id, against, prompts, limit))

    def compare_events(self, task_id: str, against: str | None = None, prompts: str | None = None,
                       limit: int = comparison.MAX_EXAMPLES) -> Iterator[dict[str, Any]]:
        """compare() as it goes: {"progress": {"done", "total", "model"}} events, then {"result": ...}.
        What can be checked up front raises before the first event."""
        artifact = self.registry.get_task_model(task_id)
        if artifact is None:
            raise ServiceError(404, f"task {task_id!r} has no completed model; `sage finetune list` shows the tasks")
        if prompts and not within_roots(Path(prompts).expanduser(), self.service.settings.roots()):
            raise ServiceError(403, f"field 'prompts': {prompts!r} is outside the Studio's folders; "
                                    "upload it with POST /api/finetune/upload-dataset")
        source = ({"prompts": str(Path(prompts).expanduser())} if prompts
                  else {"task": task_id, "home": str(self.service.settings.sage_home)})
        candidate, other = self._spec(artifact["name"]), self._spec(against or self.served())
        try:
            return self._user_errors(comparison.compare_events(candidate, other, source, limit=limit))
        except Exception as err:
            raise user_error(err) from None

    @staticmethod
    def _user_errors(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The events, a user error on the way as the ServiceError with its status."""
        try:
            yield from events
        except Exception as err:
            raise user_error(err) from None

    def switch(self, ref: str, *, require_better: bool = False, prompts: str | None = None,
               who: str | None = None, canary: Canary | None = None) -> dict[str, Any]:
        """Switch to `ref` (with a `canary` beside it, or alone); with `require_better`, only when
        it beats the served model on held-out loss (409 with the figures otherwise, the served
        model untouched)."""
        before = self.served()
        figures = None
        if require_better:
            task_id = self._task_of(ref)
            result = self.compare(task_id, against=before, prompts=prompts)
            figures = {**result["summary"], "models": {"candidate": result["candidate"], "against": result["against"]}}
            if not comparison.is_better(result):
                mine, theirs = figures["candidate"]["mean_loss"], figures["against"]["mean_loss"]
                raise ServiceError(409, f"not switched: {ref!r} has held-out loss {mine} against {theirs} for the "
                                        f"served {before!r} ({figures['examples']} examples); it must be lower",
                                   {"comparison": figures})
        answer = self.service.switch_model(ref, who=who, figures=figures, canary=canary)
        return {**answer, **({"comparison": figures} if figures else {})}

    def _task_of(self, ref: str) -> str:
        try:
            artifact = self.registry.artifact(ref)
        except Exception as err:
            raise user_error(err) from None
        if not artifact.get("task_id"):
            raise ServiceError(400, f"require_better: {ref!r} is not a fine-tune task's model, so it has no held-out "
                                    "set to be judged on; switch without require_better, or switch to a task")
        return artifact["task_id"]

    def rollback(self, who: str | None = None) -> dict[str, Any]:
        """Return to the model the latest switch (or rollback) replaced."""
        history = self.registry.list_switches(1)
        if not history or not history[0].get("from_model"):
            raise ServiceError(409, "nothing to roll back to: no switch of the served model is recorded")
        latest = history[0]
        answer = self.service.switch_model(latest["from_model"], who=who, action="rollback")
        return {**answer, "rolled_back_from": latest["to_model"]}

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.registry.list_switches(limit)
