"""The serving side's view of the registry actor: look models up, record what is served.

Blocking calls (ray.get): use them from threads (FastAPI sync routes, Gradio callbacks,
`asyncio.to_thread` in the LLM replica), never on an event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sage_ray.registry.client import RegistryClient
from sage_ray.serve.engines.base import ModelSpec
from sage_ray.serve.resolve import find_artifact, spec_of
from sage_ray.serve.settings import StudioSettings


class ServingRegistry(RegistryClient):
    """Registry lookups with the Studio's allowed roots applied."""

    def __init__(self, settings: StudioSettings):
        super().__init__(settings.sage_home)
        self.settings = settings

    def find_by_path(self, path: str) -> dict[str, Any] | None:
        wanted = {path, str(Path(path).resolve())}
        return next((a for a in self.list_artifacts() if a["path"] in wanted), None)

    def artifact(self, ref: str) -> dict[str, Any]:
        """The registry record a name, task id, 'demo'/'tiny' or allowed path names (ModelRefError if none)."""
        record = find_artifact(ref, get_artifact=lambda name: self.get_artifact(name),
                               get_task_model=lambda task: self.get_task_model(task),
                               find_by_path=self.find_by_path, roots=self.settings.roots())
        models = (Path(self.settings.sage_home) / "models").resolve()
        if (record["kind"] == "base" and Path(record["path"]).resolve().parent == models
                and self.find_by_path(record["path"]) is None):
            # 'demo' and 'tiny' are built into models/ on first use, after the registry's start-up discovery
            self.discover(prune=False)
            record = self.find_by_path(record["path"]) or record
        return record

    def spec(self, ref: str) -> ModelSpec:
        return spec_of(self.artifact(ref))

    def record_serving(self, state: dict[str, Any]) -> None:
        """Fire and forget: the actor runs one caller's calls in order, and nobody waits on it."""
        self.set_serving(state)
