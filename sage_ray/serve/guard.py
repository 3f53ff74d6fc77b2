"""RequestGuard: what every request passes before a route sees it (an ASGI middleware).

- Cross-site requests: a browser page on another site can make the user's browser POST to
  http://127.0.0.1:8000 (a form needs no CORS permission), and a DNS-rebound name can make
  that page same-origin. So a request whose Host is not one the Studio answers to is refused
  (421), and a state-changing request whose Origin is not the Studio's own is refused (403).
  Clients that are not browsers (curl, the openai SDK, sage's own) send no Origin and pass.
- Sizes: a body is counted as it streams in and refused (413) once over its bound, before it is
  all in memory or on disk: uploads get `max_upload_mb`, every other request `max_body_mb`.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UPLOAD_PATHS = ("/api/finetune/upload-dataset", "/v1/files", "/gradio_api/upload", "/upload")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class BodyTooLarge(HTTPException):
    """Raised from the body stream: an HTTPException so that FastAPI's body parsing passes it on
    (it turns other errors into a generic 400) and the app answers 413 with the message."""

    def __init__(self, path: str, limit: int):
        super().__init__(413, _too_large(path, limit))


def host_name(host_header: str) -> str:
    """The host of a Host header value, without the port ("[::1]:8000" -> "::1")."""
    parsed = urlsplit(f"//{host_header}")
    return (parsed.hostname or "").lower()


def refusal(method: str, path: str, headers: dict[str, str], allowed_hosts: list[str]) -> tuple[int, str] | None:
    """(status, message) when the request must not reach the app, else None."""
    host = headers.get("host", "")
    if "*" not in allowed_hosts and host_name(host) not in allowed_hosts:
        return 421, (f"this Studio answers to {', '.join(allowed_hosts)}, not {host or 'no Host'}; "
                     "open it by one of those names (another name may be a DNS-rebinding page)")
    origin = headers.get("origin")
    if method in UNSAFE_METHODS and origin is not None:
        parsed = urlsplit(origin)
        if origin == "null" or parsed.netloc.lower() != host.lower():
            return 403, (f"cross-site request refused: a page from {origin} may not {method} {path} here; "
                         "use the Studio's own page or an API client")
    return None


class RequestGuard:
    def __init__(self, app: Callable, *, allowed_hosts: list[str], max_body_bytes: int, max_upload_bytes: int):
        self.app = app
        self.allowed_hosts = [h.lower() for h in allowed_hosts]
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        refused = refusal(scope.get("method", "GET"), path, headers, self.allowed_hosts)
        if refused:
            return await _answer(send, *refused)
        limit = self.max_upload_bytes if path.endswith(UPLOAD_PATHS) else self.max_body_bytes
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return await _answer(send, 413, _too_large(path, limit))
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(path, limit)
            return message

        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except BodyTooLarge as err:
            if not started:
                await _answer(send, 413, err.detail)


def _too_large(path: str, limit: int) -> str:
    setting = "max_upload_mb" if path.endswith(UPLOAD_PATHS) else "max_body_mb"
    return f"the request body is over the {limit / 2**20:g} MB limit of {path} ({setting} in the Studio settings)"


async def _answer(send: Callable, status: int, message: str) -> None:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
