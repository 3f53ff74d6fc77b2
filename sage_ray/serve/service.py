"""StudioService: every Studio operation, behind both the REST API and the web UI.

It keeps no state of its own: jobs and models live in the registry actor, the served model
in the LLMServer deployment's declared config. Methods block (Ray calls, file I/O): call
them from threads, which FastAPI's sync routes and Gradio's callbacks do.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any, Iterator

from sage_ray.errors import SageError
from sage_ray.serve import deploy
from sage_ray.serve.canary import Canary
from sage_ray.serve.model_registry import ServingRegistry
from sage_ray.serve.resolve import ModelRefError, spec_of, within_roots
from sage_ray.serve.settings import StudioSettings

DATASET_SUFFIXES = (".json", ".jsonl")
PREVIEW_RECORDS = 3
SWITCH_WAIT_S = 600.0
DIRECT_DECLARE_S = 15.0  # a replica that does not answer by then is not up: the config deploy declares
ACTIVE = "switched and active"
PENDING = "switched; takes effect when the LLM service starts"


class ServiceError(SageError):
    """A request the Studio refuses; `status` is the HTTP status, the message says what to do."""

    def __init__(self, status: int, message: str, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = self.http_status = status
        self._detail = detail or {}

    def detail(self) -> dict[str, Any]:
        return self._detail


def user_error(err: Exception) -> ServiceError:
    """`err` as a ServiceError with its HTTP status when it is a user-facing error (a SageError);
    anything else (a bug, a crash) is re-raised as it is, to surface as a 500."""
    if isinstance(err, ServiceError):
        return err
    if isinstance(err, SageError):
        return ServiceError(err.http_status, str(err), err.detail())
    raise err


def safe_filename(filename: str) -> str:
    """A dataset file name reduced to letters, digits, '-', '_' and '.', with no folder part."""
    name = Path(str(filename).replace("\\", "/")).name
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix.lower()}" not in DATASET_SUFFIXES:
        raise ServiceError(400, f"dataset {filename!r}: upload a .json or .jsonl file")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:64] or "dataset"
    return f"{stem}.{suffix.lower()}"


class StudioService:
    """The Studio's operations. `llm` is the LLMServer deployment handle (None: no LLM service)."""

    def __init__(self, settings: StudioSettings, llm=None, app_name: str = "studio"):
        self.settings = settings
        self.registry = ServingRegistry(settings)
        self.llm = llm
        self.app_name = app_name
        self._tokenizers: dict[str, Any] = {}
        self.deployer = deploy.BackgroundDeployer(settings, app_name)

    # ---- models -------------------------------------------------------------------------
    def list_models(self) -> list[dict[str, Any]]:
        serving = self._serving() or {}
        active, canary = serving.get("active") or {}, serving.get("canary") or {}
        models = []
        for artifact in self.registry.list_artifacts():
            group = "base" if artifact["kind"] == "base" else "finetuned"
            share = canary.get("weight") if artifact["name"] == canary.get("name") else None
            models.append({**artifact, "group": group, "active": artifact["name"] == active.get("name"),
                           "canary_weight": share})
        return sorted(models, key=lambda m: (m["group"] != "base", m.get("created_at") or ""), reverse=False)

    def _serving(self) -> dict[str, Any] | None:
        """The LLM service's own state, or the last one it recorded when it cannot answer now."""
        if self.llm is not None:
            try:
                return self.llm.status.remote().result(timeout_s=10)
            except Exception:
                pass
        return self.registry.get_serving()

    def current_model(self, serving: dict[str, Any] | None = None) -> dict[str, Any]:
        """What is served: from `serving` (an LLM status just received) or asked now."""
        serving = serving or self._serving()
        if not serving or not serving.get("active"):
            declared = self.registry.get_active_model() or self.settings.model
            state = (serving or {}).get("state") or "not serving"
            return {"name": declared, "kind": None, "path": None, "base_model": None,
                    "state": state if state != "active" else "not serving", "error": (serving or {}).get("error")}
        active = serving["active"]
        record = self.registry.get_artifact(active["name"]) or {}
        return {"name": active["name"], "kind": active["kind"], "path": active["path"],
                "base_model": record.get("base_model") or active.get("base_path"),
                "state": serving["state"], "declared": serving.get("declared"), "error": serving.get("error"),
                "canary": serving.get("canary")}

    def served_ref(self) -> str:
        """The served model as a reference that finds it again: its registry name, else its folder."""
        current = self.current_model()
        record = self.registry.get_artifact(current["name"]) or {}
        if record and (record.get("uri") or not current.get("path") or record.get("path") == current["path"]):
            return current["name"]
        # a bare folder that shares its name with another registered model (e.g. a copy of the
        # tiny model): the name would find the other one, so the folder is the reference (a
        # shared copy, `uri`, is served from this node's cache: its path differs by design)
        return current.get("path") or current["name"]

    def switch_model(self, ref: str, wait_s: float = SWITCH_WAIT_S, *, who: str | None = None,
                     action: str = "switch", figures: dict[str, Any] | None = None,
                     canary: Canary | None = None) -> dict[str, Any]:
        """Declare `ref` as the served model (every replica reconfigures in place) and wait until
        it answers; with `canary`, that model answers its share of the requests naming no model.
        A model that fails to load leaves the old one serving: 422 with the error.
        A switch that happens is recorded (who, from, to, `figures`), so rollback can undo it."""
        before = self.served_ref()
        if canary is not None:
            canary = Canary(self._declared_name(canary.model), canary.weight)
        answer = self._switch(self._declared_name(ref), wait_s, canary)
        if canary is not None:
            figures = {**(figures or {}), "canary": canary.as_config()}
        self.registry.record_switch(action, answer["model"]["name"], from_model=before, who=who, figures=figures)
        if canary is not None and not answer["model"].get("canary"):
            raise ServiceError(422, answer["model"].get("error") or f"the canary {canary.model!r} did not load",
                               {"model": answer["model"]})
        return answer

    def _declared_name(self, ref: str) -> str:
        """How `ref` is declared to the LLM replicas: its registry name, or a bare folder's path;
        checked first (its folder, an adapter's base too, or its shared copy is there)."""
        try:
            artifact = self.registry.artifact(ref)
            spec_of(artifact, fetch=False, roots=self.settings.roots())
        except Exception as err:
            raise user_error(err) from None
        return artifact["name"] if artifact.get("created_at") else artifact["path"]

    def _switch(self, name: str, wait_s: float, canary: Canary | None) -> dict[str, Any]:
        self.registry.set_active_model(name)
        version = time.time_ns()
        declared = canary.as_config() if canary else None
        if self.llm is not None and self.settings.llm_replicas == 1:
            status = self._declare_directly(name, version, declared)
            if status is not None:
                self.deployer.submit(name, version, declared)  # durable: a restarted replica comes back with it
                return {"model": self.current_model(self._check_switched(name, status, wait_s)), "message": ACTIVE}
        details = deploy.serve_details()
        running = deploy.deployment_status(details, self.app_name) in ("HEALTHY", "UPDATING")
        deploy.declare_model(self.settings, self.app_name, name, details, version=version, canary=declared)
        if not running or self.llm is None:
            return {"model": self.current_model(), "message": PENDING}
        self._wait_for(name, wait_s)
        return {"model": self.current_model(), "message": ACTIVE}

    def _declare_directly(self, name: str, version: int, canary: dict[str, Any] | None) -> dict[str, Any] | None:
        """The one LLM replica switched by a direct call (a LoRA of the loaded base: a few ms);
        None when it cannot be reached (not started yet): then only the config deploy declares."""
        try:
            return self.llm.declare.remote(name, version, canary).result(timeout_s=DIRECT_DECLARE_S)
        except Exception:
            return None

    def _check_switched(self, name: str, status: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """The LLM status once `name` is active (waiting while it loads); 422 if it failed."""
        if status.get("state") == "loading":
            return self._wait_for(name, wait_s)
        active = status.get("active") or {}
        if active.get("name") != name and active.get("path") != name:
            raise ServiceError(422, status.get("error") or f"{name!r} did not load", {"serving": status})
        return status

    def _wait_for(self, name: str, wait_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            status = self._serving() or {}
            if status.get("declared") == name and status.get("state") != "loading":
                active = status.get("active") or {}
                if active.get("name") == name or active.get("path") == name:
                    return status
                raise ServiceError(422, status.get("error") or f"{name!r} did not load", {"serving": status})
            time.sleep(0.05)
        raise ServiceError(504, f"{name!r} is still loading after {wait_s:.0f} s; "
                                "GET /api/finetune/current-model shows when it is active")

    # ---- datasets -----------------------------------------------------------------------
    def upload_dataset(self, filename: str, content: bytes) -> dict[str, Any]:
        """Validate an uploaded dataset, keep it under SAGE_HOME/datasets, preview its first records."""
        from sage_ray.data import parse_dataset_bytes

        name = safe_filename(filename)
        limit = int(self.settings.max_upload_mb * 1024 * 1024)
        if len(content) > limit:
            raise ServiceError(413, f"dataset {name}: {len(content) / 2**20:.1f} MB is over the "
                                    f"{self.settings.max_upload_mb:g} MB upload limit; split it or raise max_upload_mb")
        try:
            dataset = parse_dataset_bytes(content, name, method=None)  # the job checks it against its method
        except Exception as err:
            raise user_error(err) from None
        folder = Path(self.settings.sage_home) / "datasets"
        folder.mkdir(parents=True, exist_ok=True)
        stem, suffix = name.rsplit(".", 1)
        path = folder / f"{stem}_{hashlib.sha256(content).hexdigest()[:8]}.{suffix}"
        path.write_bytes(content)
        return {"path": str(path), "filename": name, "records": len(dataset), "format": dataset.format,
                "kind": dataset.kind, "formats": {dataset.format: len(dataset)}, "sha256": dataset.sha256,
                "preview": self._preview(dataset.examples[:PREVIEW_RECORDS])}

    def _preview(self, examples) -> list[dict[str, Any]]:
        from sage_ray.data.tokenize import preview_example

        tokenizer = self._tokenizer()
        return [preview_example(tokenizer, example) for example in examples]

    def _tokenizer(self):
        """The served base model's tokenizer (its chat template is what training will apply)."""
        from sage_ray.models import resolve_model
        from sage_ray.data.tokenize import load_tokenizer

        folder = str(resolve_model(self.settings.model, progress=False))
        if folder not in self._tokenizers:
            self._tokenizers[folder] = load_tokenizer(folder)
        return self._tokenizers[folder]

    # ---- jobs ---------------------------------------------------------------------------
    def _config(self, request: dict[str, Any]):
        from sage_ray.config import parse_train_config

        values = {k: v for k, v in dict(request).items() if v is not None and v != ""}
        values.setdefault("model", self.settings.model)
        cfg = parse_train_config(values, source="request")
        for field, path in (("data", cfg.data), ("val_data", cfg.val_data)):
            if path and not within_roots(Path(path).expanduser(), self.settings.roots()):
                raise ServiceError(403, f"field {field!r}: dataset {path!r} is outside the Studio's folders; "
                                        "upload it with POST /api/finetune/upload-dataset")
        return cfg.model_copy(update={"model": self._base_to_train(cfg.model)})

    def _base_to_train(self, ref: str) -> str:
        """The one rule for a model named in a request: a registry name, a task id, a built-in
        model or a folder inside the allowed roots; a Hub id only where the settings allow it, and
        then the fine-tune's job downloads it (one request must never make the ingress download a
        repository); a fine-tune trains on its merged model."""
        from sage_ray.models import BUILTIN, is_hub_id

        if ref in BUILTIN:
            return ref
        try:
            artifact = self.registry.artifact(ref)
        except ModelRefError as err:
            if not is_hub_id(ref):
                raise user_error(err) from None
            if self.settings.hub_allowed():
                return ref
            raise ServiceError(403, f"field 'model': {ref!r} is not a model the Studio has, and this Studio does not "
                                    "download from the Hugging Face Hub (off by default once it is reachable from "
                                    f"the network). Fetch it on the head with `sage finetune start --model {ref} "
                                    "...`, put its folder under SAGE_HOME/models, or start the Studio with "
                                    "SAGE_STUDIO_ALLOW_HUB=1") from None
        if artifact["kind"] == "lora":
            raise ServiceError(400, f"field 'model': {ref!r} is a LoRA adapter; fine-tune its base, or merge it "
                                    "first (POST /api/finetune/tasks/{task_id}/merge) and fine-tune the merged model")
        return artifact["path"]

    def plan_job(self, request: dict[str, Any]) -> dict[str, Any]:
        """The effective config (preset applied) and the memory estimate, before anything starts."""
        from sage_ray import jobs
        from sage_ray.config import dump_train_config
        from sage_ray.presets import GiB

        try:
            cfg, device, estimate = jobs.plan(self._config(request))
        except Exception as err:
            raise user_error(err) from None
        return {"config": cfg.model_dump(mode="json"), "yaml": dump_train_config(cfg), "device": device.describe(),
                "memory": {"total_gib": round(estimate.total / GiB, 3), "text": estimate.describe()},
                "fits": True, "warning": None}

    def create_job(self, request: dict[str, Any]) -> dict[str, Any]:
        from sage_ray import jobs

        try:
            task_id = jobs.submit(self._config(request))
            return jobs.get(task_id)
        except Exception as err:
            raise user_error(err) from None

    def _jobs(self, op: str, *args: Any, **kwargs: Any) -> Any:
        from sage_ray import jobs

        try:
            return getattr(jobs, op)(*args, **kwargs)
        except Exception as err:
            raise user_error(err) from None

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._jobs("list_jobs")

    def get_job(self, task_id: str) -> dict[str, Any]:
        return self._jobs("get", task_id)

    def job_logs(self, task_id: str, tail: int = 200) -> str:
        return self._jobs("logs", task_id, tail=tail)

    def cancel_job(self, task_id: str) -> dict[str, Any]:
        return self._jobs("cancel", task_id)

    def delete_job(self, task_id: str) -> None:
        self._jobs("delete", task_id)

    def resume_job(self, task_id: str) -> dict[str, Any]:
        return self._jobs("get", self._jobs("resume", task_id))

    def merge_job(self, task_id: str) -> dict[str, Any]:
        """Merge a completed task's adapter into its base and register the merged model (a Ray
        task with its own CPU, not this ingress: see jobs.merge)."""
        return self._jobs("merge", task_id)

    # ---- chat ---------------------------------------------------------------------------
    def chat_request(self, messages: list[dict], model: str | None = None, **params: Any) -> dict[str, Any]:
        """The LLMServer request for a chat; a `model` is checked against the registry first."""
        if self.llm is None:
            raise ServiceError(503, "the LLM service is not running; start the Studio with `sage studio start`")
        if not messages:
            raise ServiceError(400, "'messages' is empty: send at least one {'role': 'user', 'content': ...}")
        if model:
            try:
                artifact = self.registry.artifact(model)
            except Exception as err:
                raise user_error(err) from None
            model = artifact["name"] if self.registry.get_artifact(artifact["name"]) else artifact["path"]
        return {"messages": messages, "model": model, **{k: v for k, v in params.items() if v is not None}}

    def chat_stream(self, messages: list[dict], model: str | None = None, max_tokens: int = 256,
                    temperature: float = 0.7) -> Iterator[str]:
        """The reply's text pieces as they are generated (for the web UI and in-process callers)."""
        request = self.chat_request(messages, model, max_tokens=max_tokens, temperature=temperature)
        for chunk in self.llm.options(stream=True).chat.remote(request):
            if chunk.get("text"):
                yield chunk["text"]
