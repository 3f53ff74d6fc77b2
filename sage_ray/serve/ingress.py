"""StudioIngress: the Studio's HTTP front door on Ray Serve.

One FastAPI app holds the OpenAI API (/v1), the Studio API (/api) and the Gradio web UI (/).
The app is built inside the replica (`__serve_build_asgi_app__`), never pickled: Gradio's
Blocks do not survive pickling (DESIGN.md).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from sage_ray.serve.settings import INGRESS_DEPLOYMENT, StudioSettings

log = logging.getLogger("ray.serve")
PUBLIC_PATHS = ("/api/health",)


def _error(status: int, message: str, detail: dict[str, Any] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status, **(detail or {})}},
                        status_code=status)


def _unwrap(err: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (RayTaskError and friends)."""
    cause = getattr(err, "cause", None)
    return _unwrap(cause) if isinstance(cause, BaseException) and cause is not err else err


def _problem(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":  # an OpenAI field (or a typo) this server does not implement
        return "not supported by this server (the README's OpenAI API table lists what is); leave it out"
    return error["msg"].removeprefix("Value error, ")


def install_error_handlers(app: FastAPI) -> None:
    from sage_ray.errors import SageError
    from sage_ray.serve.service import ServiceError

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, err: ServiceError):
        return _error(err.status, str(err), err.detail())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):  # 404 route, 405, 413 from the guard
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError):
        errors = err.errors()
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
        problems = "; ".join(f"{field}: {_problem(e)}" for field, e in zip(fields, errors))
        return _error(400, f"bad request: {problems}", {"param": fields[0] if fields else None})

    @app.exception_handler(Exception)
    async def wrapped(_: Request, err: Exception):
        inner = _unwrap(err)
        if isinstance(inner, SageError):
            return _error(inner.http_status, str(inner), inner.detail())
        log.exception("StudioIngress: unexpected error")
        return _error(500, f"internal error: {type(inner).__name__}: {inner}")


def install_auth(app: FastAPI, settings: StudioSettings) -> None:
    """With an API key set, /v1 and /api need `Authorization: Bearer <key>` (the UI has its own login)."""
    if not settings.api_key_hash:
        return

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        path = request.url.path
        if path.startswith(("/v1", "/api")) and path not in PUBLIC_PATHS:
            given = request.headers.get("authorization", "")
            if not settings.check_key(given[7:] if given.lower().startswith("bearer ") else None):
                return _error(401, "missing or wrong API key: send `Authorization: Bearer <key>`")
        return await call_next(request)


def build_asgi_app(service) -> FastAPI:
    from sage_ray.serve.guard import RequestGuard
    from sage_ray.serve.openai_api import build_openai_router
    from sage_ray.serve.openai_files import build_files_router
    from sage_ray.serve.openai_finetune import build_finetune_router
    from sage_ray.serve.studio_api import build_studio_router

    settings = service.settings
    app = FastAPI(title="sage-ray Studio", description="Fine-tune, serve and chat: the Studio's API.")
    install_error_handlers(app)
    install_auth(app, settings)
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts,  # outermost: before auth
                       max_body_bytes=int(settings.max_body_mb * 2**20),
                       max_upload_bytes=int(settings.max_upload_mb * 2**20))

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    app.include_router(build_openai_router(service))
    app.include_router(build_files_router(service))
    app.include_router(build_finetune_router(service))
    app.include_router(build_studio_router(service))
    if service.settings.ui:  # last: a mount at "/" takes every path not matched above
        from sage_ray.ui.app import mount_ui

        auth = (lambda _user, password: settings.check_key(password)) if settings.api_key_hash else None
        app = mount_ui(app, service, "/", auth=auth)
    return app


@serve.deployment(name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class StudioIngress:
    """Builds the service and the FastAPI + Gradio app in the replica."""

    def __init__(self, settings: dict[str, Any], llm):
        from sage_ray.serve.service import StudioService

        app_name = serve.get_replica_context().app_name
        self.service = StudioService(StudioSettings(**settings), llm, app_name=app_name)

    def __serve_build_asgi_app__(self):
        return build_asgi_app(self.service)
