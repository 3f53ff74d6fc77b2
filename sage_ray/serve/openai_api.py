"""The OpenAI-compatible API: GET /v1/models and POST /v1/chat/completions (with SSE streaming)."""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's request that a chat model here honours; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="A registered model or adapter; empty = the active model.")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None

    @field_validator("model")
    @classmethod
    def _default_model(cls, value: str | None) -> str | None:
        return None if value in (None, "", "default", "active") else value


def _created(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None) -> str:
    body = {**base, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def build_openai_router(service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

    @router.get("/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m["name"], "object": "model", "created": _created(m.get("created_at")), "owned_by": "sage-ray",
             "kind": m["kind"], "base_model": m.get("base_model"), "active": m["active"]}
            for m in service.list_models()]}

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        request = await run_in_threadpool(
            service.chat_request, [m.model_dump() for m in body.messages], body.model,
            max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
            top_p=body.top_p, stop=stop, seed=body.seed)
        base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time())}
        if not body.stream:
            return _completion(base, await service.llm.complete.remote(request))
        chunks = service.llm.options(stream=True).chat.remote(request)
        first = await chunks.__anext__()  # fails here, before any byte is sent, if no model can answer
        base["model"] = first["model"]
        return StreamingResponse(_sse(base, chunks), media_type="text/event-stream")

    return router


async def _sse(base: dict[str, Any], chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    yield _chunk(base, {"role": "assistant", "content": ""}, None)
    async for piece in chunks:
        if piece.get("text"):
            yield _chunk(base, {"content": piece["text"]}, None)
        if piece.get("finish_reason"):
            yield _chunk(base, {}, piece["finish_reason"])
    yield "data: [DONE]\n\n"


def _completion(base: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    usage = {"prompt_tokens": reply.get("prompt_tokens") or 0, "completion_tokens": reply.get("completion_tokens") or 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {**base, "model": reply["model"], "object": "chat.completion", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.get("text") or ""},
                         "finish_reason": reply.get("finish_reason") or "stop"}]}
