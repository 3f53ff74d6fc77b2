"""OpenAI's fine-tuning API over the Studio's own jobs: POST/GET /v1/fine_tuning/jobs, GET .../{id},
POST .../{id}/cancel | pause | resume, GET .../{id}/events, GET .../{id}/checkpoints.

A job created here is an ordinary fine-tune (sage_ray.jobs, one registry): the Studio, the CLI
and the SDK show it, and jobs started there show up here. Its id is the task id; its
fine_tuned_model is the registry name of the trained model, which /v1/chat/completions serves.
Statuses: queued -> queued, preparing/training/merging -> running, completed -> succeeded,
failed, cancelled (or paused, when it was paused here: a paused job resumes from its checkpoint).
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import Field, model_validator

from sage_ray.serve.openai_files import FileStore
from sage_ray.serve.query import only_query
from sage_ray.serve.openai_schema import Strict
from sage_ray.serve.service import ServiceError

STATUS = {"queued": "queued", "preparing": "running", "training": "running", "merging": "running",
          "completed": "succeeded", "failed": "failed", "cancelled": "cancelled"}
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (.*)$")


class Hyperparameters(Strict):
    """"auto" (or absent) leaves the value to the preset."""

    n_epochs: int | Literal["auto"] = Field("auto", description="Training epochs (1-50).")
    batch_size: int | Literal["auto"] = Field("auto", description="Examples per optimizer micro-batch (1-256).")
    learning_rate_multiplier: float | Literal["auto"] = Field(
        "auto", description="Multiplies the default learning rate (TrainConfig.lr).")

    @model_validator(mode="after")
    def _bounds(self) -> "Hyperparameters":
        for name, low, high in (("n_epochs", 1, 50), ("batch_size", 1, 256), ("learning_rate_multiplier", 1e-3, 100)):
            value = getattr(self, name)
            if value != "auto" and not low <= value <= high:
                raise ValueError(f"{name} must be 'auto' or in [{low}, {high}], got {value}")
        return self


class DpoHyperparameters(Hyperparameters):
    beta: float | Literal["auto"] = Field("auto", description="How strongly the preferences pull away from the base.")

    @model_validator(mode="after")
    def _beta(self) -> "DpoHyperparameters":
        if self.beta != "auto" and not 0 < self.beta <= 10:
            raise ValueError(f"beta must be 'auto' or in (0, 10], got {self.beta}")
        return self


class Supervised(Strict):
    hyperparameters: Hyperparameters | None = None


class Dpo(Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_method(self) -> "Method":
        if self.type == "reinforcement" or self.reinforcement is not None:
            raise ValueError("type 'reinforcement' is not supported by this server: use 'supervised' or 'dpo'")
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"type is {self.type!r} but a {other!r} block is given: give the block of its type")
        return self

    def hyperparameters(self) -> Hyperparameters | None:
        block = self.supervised if self.type == "supervised" else self.dpo
        return block.hyperparameters if block else None


class FineTuneRequest(Strict):
    model: str = Field(..., min_length=1, description="The base model: a registry name, 'tiny', 'demo' or a hub id.")
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "FineTuneRequest":
        if self.hyperparameters and self.method and self.method.hyperparameters():
            raise ValueError(f"give hyperparameters once: in method.{self.method.type}.hyperparameters")
        return self

    @property
    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def effective_hyperparameters(self) -> Hyperparameters:
        nested = self.method.hyperparameters() if self.method else None
        return nested or self.hyperparameters or Hyperparameters()


def default_lr() -> float:
    from sage_ray.config import TrainConfig

    return TrainConfig.model_fields["lr"].default


def _ts(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp()) if iso else None


class FineTuning:
    """The mapping between OpenAI's fine-tuning objects and the Studio's jobs."""

    def __init__(self, service) -> None:
        self.service = service
        self.files = FileStore(service)
        self.paused = Path(service.settings.sage_home) / "openai_files" / "paused"

    def create(self, body: FineTuneRequest) -> dict[str, Any]:
        dataset = self.files.get(body.training_file, param="training_file")["path"]
        held_out = self.files.get(body.validation_file, param="validation_file")["path"] if body.validation_file else None
        hp = body.effective_hyperparameters()
        request = {"model": body.model, "data": dataset, "val_data": held_out, "seed": body.seed,
                   "name": f"{body.suffix or 'ftjob'}-{secrets.token_hex(6)}",
                   "epochs": None if hp.n_epochs == "auto" else hp.n_epochs,
                   "batch_size": None if hp.batch_size == "auto" else hp.batch_size,
                   "lr": None if hp.learning_rate_multiplier == "auto" else default_lr() * hp.learning_rate_multiplier}
        if body.method_type == "dpo":  # the training file holds OpenAI's preference pairs
            request.update(method="dpo", beta=None if getattr(hp, "beta", "auto") == "auto" else hp.beta)
        return self.job(self.service.create_job(request))

    def job(self, record: dict[str, Any]) -> dict[str, Any]:
        """OpenAI's FineTuningJob for a job record."""
        task_id, config = record["task_id"], record.get("config") or {}
        status = STATUS.get(record["status"], "running")
        if status == "cancelled" and (self.paused / task_id).exists():
            status = "paused"
        model = self.service.registry.get_task_model(task_id) if status == "succeeded" else None
        hyper = {"n_epochs": config.get("epochs", "auto"), "batch_size": config.get("batch_size") or "auto",
                 "learning_rate_multiplier": round(config["lr"] / default_lr(), 6) if config.get("lr") else "auto"}
        kind = {"sft": "supervised"}.get(config.get("method") or "sft", config.get("method"))  # orpo, kto: as they are
        beta = {} if kind == "supervised" else {"beta": config.get("beta") or "auto"}
        method = {"type": kind, kind: {"hyperparameters": {**hyper, **beta}}}
        error = ({"code": "job_failed", "message": record.get("error") or "the fine-tune failed", "param": None}
                 if status == "failed" else None)
        eta = record.get("eta_s")
        return {"id": task_id, "object": "fine_tuning.job", "created_at": _ts(record.get("created_at")),
                "finished_at": _ts(record.get("finished_at")) if record["status"] in ("completed", "failed", "cancelled")
                else None, "model": config.get("model"), "fine_tuned_model": model["name"] if model else None,
                "organization_id": "sage-ray", "status": status, "hyperparameters": hyper,
                "training_file": self.files.by_path(config.get("data")) or config.get("data"),
                "validation_file": self.files.by_path(config.get("val_data")) or config.get("val_data"),
                "result_files": [], "trained_tokens": None, "error": error, "seed": config.get("seed"),
                "estimated_finish": int(time.time() + eta) if eta and status == "running" else None,
                "method": method,
                "integrations": [], "metadata": None, "user_provided_suffix": None,
                "status_detail": record.get("status_detail"), "progress": record.get("progress")}

    def pause(self, task_id: str) -> dict[str, Any]:
        record = self.service.get_job(task_id)
        if STATUS.get(record["status"]) not in ("queued", "running"):
            raise ServiceError(409, f"job {task_id!r} is {self.job(record)['status']}: only a queued or running job "
                                    "pauses")
        self.paused.mkdir(parents=True, exist_ok=True)
        (self.paused / task_id).touch()
        try:
            return self.job(self.service.cancel_job(task_id))
        except Exception:
            (self.paused / task_id).unlink(missing_ok=True)
            raise

    def resume(self, task_id: str) -> dict[str, Any]:
        if not (self.paused / task_id).exists():
            raise ServiceError(409, f"job {task_id!r} is not paused; only a paused job resumes "
                                    f"(the Studio API resumes failed and cancelled ones too)")
        record = self.service.resume_job(task_id)
        (self.paused / task_id).unlink(missing_ok=True)
        return self.job(record)

    def events(self, task_id: str) -> list[dict[str, Any]]:
        """The job's events, newest first: its creation, then each line of its train.log
        (progress lines, logged as JSON, are "metrics" events with their data)."""
        import json

        record = self.service.get_job(task_id)
        events = [_event(task_id, 0, _ts(record.get("created_at")), f"Created fine-tuning job: {task_id}")]
        for number, line in enumerate(self.service.job_logs(task_id, tail=100_000).splitlines(), start=1):
            match = _LOG_LINE.match(line)
            stamp, text = (match.group(1), match.group(2)) if match else (None, line)
            created = int(time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))) if stamp else events[-1]["created_at"]
            if text.startswith("EVENT "):
                events.append(_event(task_id, number, created, f"step {json.loads(text[6:]).get('step')}",
                                     "metrics", json.loads(text[6:])))
            elif text.strip():
                events.append(_event(task_id, number, created, text))
        return events[::-1]

    def checkpoints(self, task_id: str) -> list[dict[str, Any]]:
        """The servable model a job produced. Training checkpoints (for resume) are not models a
        chat can use, so they are not listed."""
        record = self.service.get_job(task_id)
        model = self.service.registry.get_task_model(task_id) if record["status"] == "completed" else None
        if model is None:
            return []
        step = record.get("step") or 0
        return [{"id": f"ftckpt-{task_id}-{step}", "object": "fine_tuning.job.checkpoint",
                 "created_at": _ts(record.get("finished_at")), "fine_tuned_model_checkpoint": model["name"],
                 "fine_tuning_job_id": task_id, "step_number": step,
                 "metrics": {"step": step, "train_loss": record.get("loss"), **_valid_metrics(record)}}]


def _valid_metrics(record: dict[str, Any]) -> dict[str, float]:
    """OpenAI's validation figures of a job: its last evaluation's loss and token accuracy."""
    history = record.get("eval_history") or []
    if not history:
        return {}
    _step, loss, accuracy = history[-1]
    return {"full_valid_loss": loss, "full_valid_mean_token_accuracy": accuracy}


def _event(task_id: str, number: int, created: int | None, message: str, kind: str = "message",
           data: dict | None = None) -> dict[str, Any]:
    return {"id": f"ftevent-{task_id}-{number}", "object": "fine_tuning.job.event", "created_at": created,
            "level": "error" if kind == "message" and "error" in message.lower() else "info",
            "message": message, "type": kind, "data": data}


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one with id `after`, at most `limit`."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def build_finetune_router(service) -> APIRouter:
    router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["OpenAI-compatible fine-tuning"])
    api = FineTuning(service)

    @router.post("")
    def create(body: FineTuneRequest) -> dict[str, Any]:
        return api.create(body)

    @router.get("")
    def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
        only_query(request, "after", "limit")
        return page([api.job(r) for r in service.list_jobs()], after, limit)

    @router.get("/{task_id}")
    def retrieve(task_id: str) -> dict[str, Any]:
        return api.job(service.get_job(task_id))

    @router.post("/{task_id}/cancel")
    def cancel(task_id: str) -> dict[str, Any]:
        return api.job(service.cancel_job(task_id))

    @router.post("/{task_id}/pause")
    def pause(task_id: str) -> dict[str, Any]:
        return api.pause(task_id)

    @router.post("/{task_id}/resume")
    def resume(task_id: str) -> dict[str, Any]:
        return api.resume(task_id)

    @router.get("/{task_id}/events")
    def events(request: Request, task_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000)):
        only_query(request, "after", "limit")
        return page(api.events(task_id), after, limit)

    @router.get("/{task_id}/checkpoints")
    def checkpoints(request: Request, task_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100)):
        only_query(request, "after", "limit")
        return page(api.checkpoints(task_id), after, limit)

    return router
