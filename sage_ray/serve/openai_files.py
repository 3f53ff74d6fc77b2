"""OpenAI's Files API for fine-tuning data: POST /v1/files (purpose "fine-tune"), GET /v1/files,
GET and DELETE /v1/files/{id}, GET /v1/files/{id}/content.

An upload is the Studio's dataset upload (StudioService.upload_dataset): validated at once
with the same file / line / field errors, sanitised name, size bound, kept under
$SAGE_HOME/datasets. The OpenAI view of it (id, name, size, time) is a small JSON record in
$SAGE_HOME/openai_files/, so a job created with a file id trains on that dataset.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from sage_ray.serve.query import only_query
from sage_ray.serve.service import ServiceError

PURPOSE = "fine-tune"
FORM_FIELDS = {"file", "purpose"}
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


class FileStore:
    """The OpenAI file records of the Studio's uploaded datasets."""

    def __init__(self, service) -> None:
        self.service = service
        self.root = Path(service.settings.sage_home) / "openai_files"

    def create(self, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        if purpose != PURPOSE:
            raise ServiceError(400, f"purpose {purpose!r} is not supported: files here are fine-tuning data, "
                                    f"upload them with purpose {PURPOSE!r}", {"param": "purpose"})
        upload = self.service.upload_dataset(filename, content)  # validates; DatasetError names file/line/field
        record = {"id": f"file-{secrets.token_hex(12)}", "object": "file", "bytes": len(content),
                  "created_at": int(time.time()), "filename": upload["filename"], "purpose": PURPOSE,
                  "status": "processed", "status_details": None, "path": upload["path"],
                  "records": upload["records"], "format": upload["format"]}
        self.root.mkdir(parents=True, exist_ok=True)
        self._file(record["id"]).write_text(json.dumps(record))
        return record

    def get(self, file_id: str, *, param: str | None = None) -> dict[str, Any]:
        """The record; 404 (400 naming `param` when the id came in a request body) if there is none."""
        path = self._file(file_id) if _FILE_ID.match(file_id) else None
        if path is None or not path.is_file():
            if param:
                raise ServiceError(400, f"{param}: no file {file_id!r}; upload it first with POST /v1/files",
                                   {"param": param})
            raise ServiceError(404, f"no file {file_id!r}; GET /v1/files lists them")
        return json.loads(path.read_text())

    def list(self) -> list[dict[str, Any]]:
        records = [json.loads(p.read_text()) for p in self.root.glob("file-*.json")] if self.root.is_dir() else []
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def by_path(self, dataset: str | None) -> str | None:
        """The id of the file whose dataset is `dataset` (a job's config names the path)."""
        return next((r["id"] for r in self.list() if r["path"] == dataset), None)

    def delete(self, file_id: str) -> None:
        record = self.get(file_id)
        self._file(file_id).unlink()
        if not any(r["path"] == record["path"] for r in self.list()):  # uploads of equal content share it
            Path(record["path"]).unlink(missing_ok=True)

    def _file(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"


def public(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's FileObject (the dataset's path on the head stays inside)."""
    return {k: v for k, v in record.items() if k not in ("path", "records", "format")}


def build_files_router(service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible fine-tuning"])
    store = FileStore(service)

    @router.post("/files")
    async def create_file(request: Request) -> dict[str, Any]:
        from fastapi.concurrency import run_in_threadpool

        form = await request.form()
        unknown = sorted(set(form) - FORM_FIELDS)
        if unknown:
            raise ServiceError(400, f"{', '.join(unknown)}: not supported by this server; send file and purpose",
                               {"param": unknown[0]})
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ServiceError(400, "file: missing; send the dataset as a multipart file", {"param": "file"})
        limit = int(service.settings.max_upload_mb * 1024 * 1024)
        content = await upload.read(limit + 1)  # never read more than the limit allows
        return public(await run_in_threadpool(store.create, upload.filename or "dataset.jsonl", content,
                                              str(form.get("purpose") or "")))

    @router.get("/files")
    def list_files(request: Request, purpose: str | None = Query(None), limit: int = Query(10_000, ge=1, le=10_000),
                   after: str | None = Query(None), order: str = Query("desc", pattern="^(asc|desc)$")):
        only_query(request, "purpose", "limit", "after", "order")
        records = [r for r in store.list() if purpose in (None, r["purpose"])]
        if order == "asc":
            records.reverse()
        if after:
            ids = [r["id"] for r in records]
            records = records[ids.index(after) + 1:] if after in ids else []
        page = records[:limit]
        return {"object": "list", "data": [public(r) for r in page], "has_more": len(records) > limit,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}

    @router.get("/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        return public(store.get(file_id))

    @router.get("/files/{file_id}/content")
    def file_content(file_id: str) -> Response:
        return Response(Path(store.get(file_id)["path"]).read_bytes(), media_type="application/octet-stream")

    @router.delete("/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        store.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    return router
