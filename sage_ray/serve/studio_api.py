"""The Studio REST API under /api/finetune, compatible with SAGE Studio's routes.

Routes are sync functions on purpose: the service blocks on Ray calls, and FastAPI runs sync
routes in its thread pool, off the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, File, Query, UploadFile
from pydantic import BaseModel, ConfigDict

from sage_ray.serve.service import ServiceError


class SwitchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_path: str


def build_studio_router(service) -> APIRouter:
    router = APIRouter(prefix="/api/finetune", tags=["Studio"])

    @router.get("/models")
    def models() -> list[dict[str, Any]]:
        return service.list_models()

    @router.get("/current-model")
    def current_model() -> dict[str, Any]:
        return service.current_model()

    @router.post("/switch-model")
    def switch_model(model_path: str | None = Query(None, description="A path, a task id or a registry name."),
                     body: SwitchRequest | None = Body(None)) -> dict[str, Any]:
        ref = model_path or (body.model_path if body else None)
        if not ref:
            raise ServiceError(400, "say which model: ?model_path=... or a JSON body {\"model_path\": ...}")
        return service.switch_model(ref)

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
