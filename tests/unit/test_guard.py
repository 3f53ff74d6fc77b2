"""RequestGuard on a bare Starlette app through real HTTP semantics (httpx's ASGI transport):
cross-site and DNS-rebinding requests, bodies counted as they stream."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI, Request

from sage_ray.serve.guard import RequestGuard, refusal

LOOPBACK = ["127.0.0.1", "localhost", "::1"]


def make_app() -> tuple[FastAPI, list[int]]:
    app = FastAPI()
    seen: list[int] = []

    @app.post("/api/finetune/switch-model")
    async def switch(request: Request):
        body = await request.body()
        seen.append(len(body))
        return {"ok": True}

    @app.post("/api/finetune/upload-dataset")
    async def upload(request: Request):
        seen.append(len(await request.body()))
        return {"ok": True}

    app.add_middleware(RequestGuard, allowed_hosts=LOOPBACK, max_body_bytes=1000, max_upload_bytes=5000)
    return app, seen


def call(app, method: str, path: str, *, host: str = "127.0.0.1:8000", **kwargs) -> httpx.Response:
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(run())


def test_cross_site_posts_are_refused_with_and_without_a_body():
    app, seen = make_app()
    for body in ({}, {"content": b"model_path=/etc"}):
        answer = call(app, "POST", "/api/finetune/switch-model", headers={"Origin": "https://evil.example"}, **body)
        assert answer.status_code == 403 and "cross-site" in answer.json()["error"]["message"]
    assert call(app, "POST", "/api/finetune/switch-model", headers={"Origin": "null"}).status_code == 403
    assert seen == []  # nothing reached the route
    same = call(app, "POST", "/api/finetune/switch-model", headers={"Origin": "http://127.0.0.1:8000"})
    assert same.status_code == 200  # the Studio's own page
    assert call(app, "POST", "/api/finetune/switch-model").status_code == 200  # an API client sends no Origin


def test_a_dns_rebound_host_is_refused():
    app, seen = make_app()
    answer = call(app, "POST", "/api/finetune/switch-model", host="evil.example:8000",
                  headers={"Origin": "http://evil.example:8000"})  # same-origin for the browser
    assert answer.status_code == 421 and "evil.example" in answer.json()["error"]["message"] and seen == []
    assert call(app, "POST", "/api/finetune/switch-model", host="localhost:8000").status_code == 200
    assert refusal("GET", "/", {"host": "[::1]:8000"}, LOOPBACK) is None
    assert refusal("GET", "/", {"host": "anything"}, ["*"]) is None


def test_bodies_are_bounded_as_they_stream():
    app, seen = make_app()
    big = call(app, "POST", "/api/finetune/switch-model", content=b"x" * 1001)
    assert big.status_code == 413 and "max_body_mb" in big.json()["error"]["message"]

    async def chunks(n: int, size: int = 400):  # no Content-Length: counted chunk by chunk
        for _ in range(n):
            yield b"y" * size

    streamed = call(app, "POST", "/api/finetune/switch-model", content=chunks(10))
    assert streamed.status_code == 413
    assert call(app, "POST", "/api/finetune/upload-dataset", content=chunks(10)).status_code == 200  # 4000 <= 5000
    assert call(app, "POST", "/api/finetune/upload-dataset", content=chunks(20)).status_code == 413
    assert seen == [4000]
