"""From what a user types (a registry name, a task id, a path, 'demo') to what an engine loads.

Paths are served only from inside the allowed roots (SAGE_HOME and configured folders): the
API must never become a way to read arbitrary files of the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence, get_args

from sage_ray import storage
from sage_ray.artifacts import ADAPTER_CONFIG, is_adapter, is_model
from sage_ray.config import TaskType
from sage_ray.errors import SageError
from sage_ray.models import BUILTIN, ModelNotFoundError, resolve_model
from sage_ray.registry.status import JobStatus
from sage_ray.serve.engines.base import ModelSpec, adapter_base


class ModelRefError(SageError, LookupError):
    """A model reference that names nothing servable; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.http_status = status


def within_roots(path: Path, roots: Sequence[Path]) -> bool:
    """True when `path`, symlinks resolved, lies inside one of `roots`."""
    real = path.resolve()
    return any(real.is_relative_to(root.resolve()) for root in roots)


def _base_folder(artifact: dict[str, Any], roots: Sequence[Path] | None) -> str:
    """The base model folder a LoRA adapter runs on: its adapter_config's base when that is a
    local folder (training writes the resolved path), else the registry's base reference. With
    `roots` (the Studio), a base outside them or on the Hub is refused: an adapter file must not
    make the Studio read any folder or download a repository."""
    written = adapter_base(Path(artifact["path"]))
    if written and is_model(written) and (roots is None or within_roots(Path(written), roots)):
        return written
    ref = artifact.get("base_model") or written
    if not ref:
        raise ModelRefError(f"adapter {artifact['name']!r} names no base model in {ADAPTER_CONFIG}", 409)
    if roots is not None and ref not in BUILTIN and not (Path(ref).is_absolute() and within_roots(Path(ref), roots)):
        raise ModelRefError(f"the base model {ref!r} of adapter {artifact['name']!r} is outside the folders the "
                            "Studio serves from; put the base there (or add its folder to SAGE_STUDIO_ALLOWED_ROOTS)",
                            403)
    try:
        return str(resolve_model(ref, progress=False))
    except ModelNotFoundError as err:
        raise ModelRefError(f"the base model {ref!r} of adapter {artifact['name']!r} is not available: {err}", 409)


def spec_of(artifact: dict[str, Any], *, fetch: bool = True, roots: Sequence[Path] | None = None) -> ModelSpec:
    """The engine's view of a registry artifact. A model whose folder is not on this node but
    has a shared copy (SAGE_STORAGE) is fetched into the node's verified cache; `fetch=False`
    only checks that it could be (the ingress checks, the LLM replica's node fetches)."""
    path = Path(artifact["path"])
    if not path.is_dir():
        if not artifact.get("uri"):
            raise ModelRefError(f"model {artifact['name']!r} is registered at {artifact['path']}, "
                                "but that folder is gone; run `sage llm model show` to see what remains", 410)
        if not fetch:
            return ModelSpec(name=artifact["name"], path=artifact["uri"], kind=artifact["kind"])
        try:
            path = storage.fetch(artifact["uri"])
        except storage.StorageError as err:
            raise ModelRefError(f"model {artifact['name']!r} is not on this node and fetching its shared copy "
                                f"failed: {err}", 424) from err
        artifact = {**artifact, "path": str(path)}
    base = _base_folder(artifact, roots) if artifact["kind"] == "lora" else None
    return ModelSpec(name=artifact["name"], path=str(path), kind=artifact["kind"], base_path=base)


def _describe_path(path: Path) -> dict[str, Any]:
    if is_adapter(path):
        return {"name": path.name, "kind": "lora", "path": str(path), "base_model": adapter_base(path)}
    if is_model(path):
        return {"name": path.name, "kind": "base", "path": str(path), "base_model": None}
    raise ModelRefError(f"{path} is neither a model folder (config.json) nor a LoRA adapter ({ADAPTER_CONFIG})", 400)


class Registry(Protocol):
    """The registry reads a reference needs (RegistryClient, ReadOnlyRegistry)."""

    def get_artifact(self, name: str) -> dict | None: ...
    def get_task_model(self, task_id: str) -> dict | None: ...
    def list_artifacts(self) -> list[dict]: ...
    def list_jobs(self, status: str | None = None) -> list[dict]: ...


def find_by_path(registry: Registry, path: str | Path) -> dict[str, Any] | None:
    wanted = {str(path), str(Path(path).resolve())}
    return next((a for a in registry.list_artifacts() if a["path"] in wanted), None)


def newest_of_task_type(registry: Registry, ref: str) -> dict[str, Any] | None:
    """The newest completed fine-tune of task type `ref` (code, qa, chat, instruction, custom: what
    `sage finetune quickstart code` trained), as SAGE's tools named them; None if `ref` is none."""
    if ref not in get_args(TaskType):
        return None
    done = [job for job in registry.list_jobs(JobStatus.COMPLETED) if (job.get("config") or {}).get("task") == ref]
    for job in sorted(done, key=lambda job: job.get("finished_at") or job["created_at"], reverse=True):
        model = registry.get_task_model(job["task_id"])
        if model is not None:
            return model
    return None


def find_artifact(ref: str, registry: Registry, roots: Sequence[Path], *, build: bool = True) -> dict[str, Any]:
    """The one resolver of model references: the registry record `ref` names, as a registry
    name, a task id (its merged model, else its adapter), a task type (its newest completed
    fine-tune), a built-in model ('demo', 'tiny';
    built on first use unless `build` is False: then only its name is checked), or a path
    inside `roots` (a path the registry does not know is described from its files)."""
    ref = (ref or "").strip()
    if not ref:
        raise ModelRefError("no model given: pass a registry name, a task id or a path", 400)
    for lookup in (registry.get_artifact, registry.get_task_model, lambda kind: newest_of_task_type(registry, kind)):
        record = lookup(ref)
        if record is not None:
            return record
    if ref in BUILTIN:
        if not build:
            return {"name": ref, "kind": "base", "path": None, "base_model": None}
        folder = resolve_model(ref, progress=False)
        return find_by_path(registry, folder) or _describe_path(folder)
    if "/" not in ref and "\\" not in ref and not ref.startswith(("~", ".")):
        raise ModelRefError(f"no model named {ref!r}: not a registry name, a task id or a path; "
                            "GET /api/finetune/models lists them")
    path = Path(ref).expanduser()
    if not path.is_absolute() or ".." in path.parts:
        raise ModelRefError(f"model path {ref!r} must be absolute and must not contain '..'", 400)
    if not within_roots(path, roots):
        raise ModelRefError(f"model path {ref!r} is outside the folders the Studio serves from "
                            f"({', '.join(map(str, roots))}); move the model there or add its folder to "
                            "SAGE_STUDIO_ALLOWED_ROOTS", 403)
    if not path.is_dir():
        raise ModelRefError(f"no model folder at {ref!r}")
    return find_by_path(registry, path) or _describe_path(path)
