"""The serving side's view of the registry actor: look models up, record what is served.

Blocking calls (ray.get): use them from threads (FastAPI sync routes, Gradio callbacks,
`asyncio.to_thread` in the LLM replica), never on an event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sage_ray.registry.client import RegistryClient
from sage_ray.serve.engines.base import ModelSpec
from sage_ray.serve.resolve import find_artifact, find_by_path, spec_of
from sage_ray.serve.settings import StudioSettings


class ServingRegistry(RegistryClient):
    """Registry lookups with the Studio's allowed roots applied."""

    def __init__(self, settings: StudioSettings):
        super().__init__(settings.sage_home)
        self.settings = settings

    def artifact(self, ref: str) -> dict[str, Any]:
        """The registry record a name, task id, 'demo'/'tiny' or allowed path names (ModelRefError if none)."""
        record = find_artifact(ref, self, self.settings.roots())
        models = (Path(self.settings.sage_home) / "models").resolve()
        if (record["kind"] == "base" and Path(record["path"]).resolve().parent == models
                and find_by_path(self, record["path"]) is None):
            # 'demo' and 'tiny' are built into models/ on first use, after the registry's start-up discovery
            self.discover(prune=False)
            record = find_by_path(self, record["path"]) or record
        return record

    def spec(self, ref: str) -> ModelSpec:
        return spec_of(self.artifact(ref), roots=self.settings.roots())

    def record_serving(self, state: dict[str, Any]) -> None:
        """Fire and forget: the actor runs one caller's calls in order, and nobody waits on it."""
        self.set_serving(state)
