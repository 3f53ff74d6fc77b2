"""The OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions and /v1/completions
(with SSE streaming). Request bodies are checked by sage_ray.serve.openai_schema; `n` choices
are n engine requests run side by side (a seed gives choice i the seed + i)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from datetime import datetime
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from sage_ray.serve.openai_schema import ChatCompletionRequest, CompletionRequest


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside the calls, OpenAI tool_calls) of a reply that calls tools in the format of
    Qwen 2.5/3 and Hermes templates: <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
    A block that is not such JSON stays in the text."""
    calls, kept, last = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        try:
            value = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            continue
        arguments = value.get("arguments", value.get("parameters", {}))
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {
            "name": value["name"], "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def _created(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0


def _choice_requests(base: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """n copies of an engine request; with a seed each choice gets its own (else all n are alike)."""
    seed = base.get("seed")
    return [{**base, **({"seed": seed + i} if seed is not None else {})} for i in range(n)]


def build_openai_router(service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

    @router.get("/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m["name"], "object": "model", "created": _created(m.get("created_at")), "owned_by": "sage-ray",
             "kind": m["kind"], "base_model": m.get("base_model"), "active": m["active"],
             "canary_weight": m.get("canary_weight")}
            for m in service.list_models()]}

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        request = await run_in_threadpool(service.chat_request, [m.engine_message() for m in body.messages],
                                          body.model, **body.engine_request())
        return await _answer(service, body, _choice_requests(request, body.n), ChatFormat(body))

    @router.post("/completions")
    async def completions(body: CompletionRequest):
        request = await run_in_threadpool(service.chat_request, [{"role": "user", "content": p} for p in body.prompts],
                                          body.model, **body.engine_request())
        # checked like a chat (model resolved, prompt size bounded by its messages); the engine gets `prompt` raw
        requests = [{**r, "messages": [{"role": "user", "content": prompt}], "prompt": prompt}
                    for prompt in body.prompts for r in _choice_requests(request, body.n)]
        return await _answer(service, body, requests, CompletionFormat(body))

    return router


async def _answer(service, body, requests: list[dict[str, Any]], fmt) -> Any:
    base = {"id": f"{fmt.prefix}-{secrets.token_hex(12)}", "created": int(time.time())}
    if not body.stream:
        replies = await asyncio.gather(*(service.llm.complete.remote(r) for r in requests))
        return fmt.whole(base, replies)
    streams = [service.llm.options(stream=True).chat.remote(r) for r in requests]
    # fails here, before any byte is sent, if no model can answer or a parameter is refused
    firsts = await asyncio.gather(*(s.__anext__() for s in streams))
    base["model"] = firsts[0]["model"]
    return StreamingResponse(_sse(base, streams, fmt), media_type="text/event-stream")


async def _merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, piece) from every stream as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for piece in stream:
                await queue.put((index, piece))
            await queue.put((index, None))
        except Exception as err:  # raised to the reader, which ends the response
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, piece = await queue.get()
            if isinstance(piece, Exception):
                raise piece
            if piece is None:
                left -= 1
            else:
                yield index, piece
    finally:
        for task in tasks:
            task.cancel()


async def _sse(base: dict[str, Any], streams: list, fmt) -> AsyncIterator[str]:
    usage = fmt.include_usage
    extra = {"usage": None} if usage else {}
    for index in range(len(streams)):
        opening = fmt.opening(index)
        if opening:
            yield _event({**base, **extra, **opening})
    totals = {"prompt_tokens": 0, "completion_tokens": 0}
    prompted: set[int] = set()
    async for index, piece in _merged(streams):
        if piece.get("finish_reason"):
            totals["completion_tokens"] += piece.get("completion_tokens") or 0
            if fmt.counts_prompt(index, prompted):
                totals["prompt_tokens"] += piece.get("prompt_tokens") or 0
        if piece.get("text") or piece.get("logprobs") or piece.get("finish_reason"):
            yield _event({**base, **extra, "object": fmt.chunk_object, "choices": [fmt.chunk(index, piece)]})
    if usage:
        totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
        yield _event({**base, "object": fmt.chunk_object, "choices": [], "usage": totals})
    yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _usage(replies: list[dict[str, Any]], prompt_of: Callable[[int], int | None]) -> dict[str, int]:
    """Token counts; a prompt shared by several choices counts once, as in OpenAI's usage."""
    prompts = {prompt_of(i): r.get("prompt_tokens") or 0 for i, r in enumerate(replies)}
    usage = {"prompt_tokens": sum(prompts.values()),
             "completion_tokens": sum(r.get("completion_tokens") or 0 for r in replies)}
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


class ChatFormat:
    """OpenAI's chat.completion and chat.completion.chunk objects."""

    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def __init__(self, body: ChatCompletionRequest) -> None:
        self.logprobs = body.logprobs
        self.tools = body.tools_offered
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def whole(self, base: dict[str, Any], replies: list[dict[str, Any]]) -> dict[str, Any]:
        choices = [{"index": i, **self._message(r), "logprobs": {"content": r.get("logprobs") or []}
                    if self.logprobs else None} for i, r in enumerate(replies)]
        return {**base, "model": replies[0]["model"], "object": "chat.completion", "choices": choices,
                "usage": _usage(replies, lambda i: 0)}

    def _message(self, reply: dict[str, Any]) -> dict[str, Any]:
        text, reason = reply.get("text") or "", reply.get("finish_reason") or "stop"
        calls = parse_tool_calls(text) if self.tools else (text, [])
        if not calls[1]:
            return {"message": {"role": "assistant", "content": text}, "finish_reason": reason}
        return {"message": {"role": "assistant", "content": calls[0] or None, "tool_calls": calls[1]},
                "finish_reason": "tool_calls"}

    def opening(self, index: int) -> dict[str, Any] | None:
        return {"object": self.chunk_object, "choices": [
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}

    def chunk(self, index: int, piece: dict[str, Any]) -> dict[str, Any]:
        return {"index": index, "delta": {"content": piece["text"]} if piece.get("text") else {},
                "logprobs": {"content": piece.get("logprobs") or []} if self.logprobs else None,
                "finish_reason": piece.get("finish_reason")}

    def counts_prompt(self, index: int, seen: set[int]) -> bool:
        first = not seen
        seen.add(0)
        return first


class CompletionFormat:
    """OpenAI's text_completion objects (streamed chunks have the same object name)."""

    prefix, chunk_object = "cmpl", "text_completion"

    def __init__(self, body: CompletionRequest) -> None:
        self.body = body
        self.logprobs = body.logprobs is not None
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.offsets: dict[int, int] = {}

    def _prompt_index(self, index: int) -> int:
        return index // self.body.n

    def whole(self, base: dict[str, Any], replies: list[dict[str, Any]]) -> dict[str, Any]:
        choices = [self.chunk(i, r, whole=True) for i, r in enumerate(replies)]
        for choice in choices:
            choice["finish_reason"] = choice["finish_reason"] or "stop"
        return {**base, "model": replies[0]["model"], "object": "text_completion", "choices": choices,
                "usage": _usage(replies, self._prompt_index)}

    def opening(self, index: int) -> dict[str, Any] | None:
        if not self.body.echo:
            return None
        return {"object": self.chunk_object, "choices": [
            {"index": index, "text": self.body.prompts[self._prompt_index(index)], "logprobs": None,
             "finish_reason": None}]}

    def chunk(self, index: int, piece: dict[str, Any], whole: bool = False) -> dict[str, Any]:
        text = piece.get("text") or ""
        if whole and self.body.echo:
            text = self.body.prompts[self._prompt_index(index)] + text
        return {"index": index, "text": text, "logprobs": self._legacy_logprobs(index, piece.get("logprobs") or [])
                if self.logprobs else None, "finish_reason": piece.get("finish_reason")}

    def _legacy_logprobs(self, index: int, entries: list[dict]) -> dict[str, list]:
        """The completions API's older shape: parallel lists, top tokens as {token: logprob}."""
        offset = self.offsets.get(index, len(self.body.prompts[self._prompt_index(index)]) if self.body.echo else 0)
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry["token"])
        self.offsets[index] = offset
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs") or []} for e in entries],
                "text_offset": offsets}

    def counts_prompt(self, index: int, seen: set[int]) -> bool:
        prompt = self._prompt_index(index)
        first = prompt not in seen
        seen.add(prompt)
        return first
