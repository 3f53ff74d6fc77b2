"""The Studio REST API under /api/finetune, compatible with SAGE Studio's routes.

Routes are sync functions on purpose: the service blocks on Ray calls, and FastAPI runs sync
routes in its thread pool, off the event loop.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

from fastapi import APIRouter, Body, Depends, File, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from sage_ray.comparison import MAX_EXAMPLES, MAX_LIMIT
from sage_ray.serve.canary import canary_of
from sage_ray.serve.promotion import Promotion
from sage_ray.serve.query import declared_query_only
from sage_ray.serve.service import ServiceError

log = logging.getLogger(__name__)


class SwitchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_path: str
    require_better: bool = Field(False, description="Switch only if the model's held-out loss beats the served one's (409 if not).")
    prompts: str | None = Field(None, description="require_better: judge on this dataset file instead of the task's held-out set.")
    canary: str | None = Field(None, description="A second model that answers `weight` of the requests naming no model.")
    weight: float | None = Field(None, description="The canary's share of those requests, between 0 and 1 (e.g. 0.1).")


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    against: str | None = Field(None, description="The model to compare with (default: the served one).")
    prompts: str | None = Field(None, description="A dataset file (inside the Studio's folders) instead of the task's held-out set.")
    limit: int = Field(MAX_EXAMPLES, ge=1, le=MAX_LIMIT, description="At most this many examples.")
    stream: bool = Field(False, description="Answer with NDJSON lines: {\"progress\": {done, total, model}} as "
                                            "each answer is scored, then {\"result\": ...}.")


def who(request: Request) -> str:
    """Who asked, for the switch history: a name the client gives, else its address."""
    return request.headers.get("x-sage-user") or (request.client.host if request.client else "unknown")


def ndjson(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Events as JSON lines; an error once the answer has started is the last line,
    {"error": {"message", "status"}}, as the routes' error body says it."""
    try:
        for event in events:
            yield json.dumps(event) + "\n"
    except ServiceError as err:
        yield json.dumps({"error": {"message": str(err), "status": err.status, **err.detail()}}) + "\n"
    except Exception as err:  # a crash: the client still learns the stream failed, and why
        log.exception("streamed request failed")
        yield json.dumps({"error": {"message": f"internal error: {err}", "status": 500}}) + "\n"


def build_studio_router(service) -> APIRouter:
    router = APIRouter(prefix="/api/finetune", tags=["Studio"], dependencies=[Depends(declared_query_only)])
    promotion = Promotion(service)

    @router.get("/models")
    def models() -> list[dict[str, Any]]:
        return service.list_models()

    @router.get("/current-model")
    def current_model() -> dict[str, Any]:
        return service.current_model()

    @router.post("/switch-model")
    def switch_model(request: Request,
                     model_path: str | None = Query(None, description="A path, a task id or a registry name."),
                     require_better: bool = Query(False, description="Switch only if it beats the served model."),
                     body: SwitchRequest | None = Body(None)) -> dict[str, Any]:
        ref = model_path or (body.model_path if body else None)
        if not ref:
            raise ServiceError(400, "say which model: ?model_path=... or a JSON body {\"model_path\": ...}")
        canary = canary_of(body.canary, body.weight) if body else None
        return promotion.switch(ref, require_better=require_better or bool(body and body.require_better),
                                prompts=body.prompts if body else None, who=who(request), canary=canary)

    @router.post("/rollback")
    def rollback(request: Request) -> dict[str, Any]:
        return promotion.rollback(who=who(request))

    @router.get("/switches")
    def switches(limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        return promotion.history(limit)

    @router.post("/tasks/{task_id}/compare")
    def compare(task_id: str, body: CompareRequest | None = Body(None)) -> dict[str, Any]:
        body = body or CompareRequest()
        if not body.stream:
            return promotion.compare(task_id, against=body.against, prompts=body.prompts, limit=body.limit)
        events = promotion.compare_events(task_id, against=body.against, prompts=body.prompts, limit=body.limit)
        return StreamingResponse(ndjson(events), media_type="application/x-ndjson")

    @router.post("/upload-dataset")
    def upload_dataset(file: UploadFile = File(..., description="A JSON array or JSONL dataset.")) -> dict[str, Any]:
        limit = int(service.settings.max_upload_mb * 1024 * 1024)
        content = file.file.read(limit + 1)  # never read more than the limit allows
        return service.upload_dataset(file.filename or "dataset.json", content)

    @router.post("/plan")
    def plan(request: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return service.plan_job(request)

    @router.post("/create")
    def create(request: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return service.create_job(request)

    @router.get("/tasks")
    def tasks() -> list[dict[str, Any]]:
        return service.list_jobs()

    @router.get("/tasks/{task_id}")
    def task(task_id: str) -> dict[str, Any]:
        return service.get_job(task_id)

    @router.get("/tasks/{task_id}/logs")
    def logs(task_id: str, tail: int = Query(200, ge=1, le=100_000)) -> dict[str, Any]:
        return {"task_id": task_id, "logs": service.job_logs(task_id, tail=tail)}

    @router.post("/tasks/{task_id}/cancel")
    def cancel(task_id: str) -> dict[str, Any]:
        return service.cancel_job(task_id)

    @router.post("/tasks/{task_id}/resume")
    def resume(task_id: str) -> dict[str, Any]:
        return service.resume_job(task_id)

    @router.post("/tasks/{task_id}/merge")
    def merge(task_id: str) -> dict[str, Any]:
        return service.merge_job(task_id)

    @router.delete("/tasks/{task_id}")
    def delete(task_id: str) -> dict[str, Any]:
        service.delete_job(task_id)
        return {"deleted": task_id}

    return router
