"""StudioClient: the Python SDK for a running Studio, over its HTTP API (httpx).

    from sage_ray.client import StudioClient
    studio = StudioClient()                       # $SAGE_STUDIO_URL or http://127.0.0.1:8000
    upload = studio.datasets.upload("my_data.json")
    job = studio.jobs.create(model="demo", data=upload.path, epochs=1)
    studio.jobs.wait(job.task_id, on_progress=lambda j: print(j.status, j.progress))
    print(studio.models.switch(job.task_id))      # "switched and active"
    for piece in studio.chat("Hello!", stream=True):
        print(piece, end="")

Everything goes through the Studio's routes (/api/finetune/*, /v1/*), so the client needs no
Ray and works from any machine that can reach the Studio. The `sage` CLI is built on it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from sage_ray import env
from sage_ray.client_types import TERMINAL, CurrentModel, Job, Model, Upload, _pick

__all__ = ["StudioClient", "StudioError", "StudioUnavailableError", "Job", "Model", "CurrentModel", "Upload",
           "TERMINAL"]

DEFAULT_URL = "http://127.0.0.1:8000"
SWITCH_TIMEOUT_S = 660.0  # the Studio waits up to 600 s for a new model to load before answering
FULL_LOG_LINES = 100_000  # the most lines the logs route returns in one answer


class StudioError(Exception):
    """The Studio refused a request (`status` is the HTTP status) or could not be reached (status None)."""

    def __init__(self, status: int | None, message: str, detail: dict[str, Any] | None = None):
        super().__init__(message if status is None else f"{message} (HTTP {status})")
        self.status = status
        self.message = message
        self.detail = detail or {}


class StudioUnavailableError(StudioError):
    """Nothing answers at the Studio's URL."""


class StudioClient:
    """A client for the Studio at `url`; `api_key` is sent as `Authorization: Bearer <key>`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        self.url = (url or env.value("SAGE_STUDIO_URL") or DEFAULT_URL).rstrip("/")
        if self.url.endswith("/v1"):  # an OpenAI base URL given by habit: the Studio's root is one level up
            self.url = self.url[:-3]
        api_key = api_key or env.value("SAGE_STUDIO_API_KEY") or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.jobs = Jobs(self)
        self.models = Models(self)
        self.datasets = Datasets(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "StudioClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- HTTP ---------------------------------------------------------------------------
    def _unreachable(self, err: Exception) -> StudioUnavailableError:
        return StudioUnavailableError(None, f"no Studio answers at {self.url} ({type(err).__name__}): start one "
                                            "with `sage studio start`, or point SAGE_STUDIO_URL / --base-url at "
                                            "the one that runs")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; its JSON answer, or StudioError with the Studio's message."""
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise self._unreachable(err) from None
        except httpx.TimeoutException as err:
            raise StudioError(None, f"{method} {path}: no answer from {self.url} in time ({err}); retry with a "
                                    "longer StudioClient(timeout=...)") from None
        _raise_for(response)
        return response.json()

    def stream_lines(self, method: str, path: str, **kwargs: Any) -> Iterator[str]:
        """A streamed answer's lines (SSE or NDJSON); StudioError for a refused request."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                yield from response.iter_lines()
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise self._unreachable(err) from None

    def health(self) -> bool:
        """True when a Studio answers at the URL."""
        try:
            return self.request("GET", "/api/health").get("status") == "ok"
        except StudioError:
            return False

    # ---- chat ---------------------------------------------------------------------------
    def chat(self, messages: list[dict[str, str]] | str, model: str | None = None, stream: bool = False,
             **sampling: Any) -> str | Iterator[str]:
        """The reply to `messages` (or one user message given as a string) from `model` (None = the
        active model). With `stream=True`, an iterator of the reply's text pieces as they come.
        `sampling`: max_tokens, temperature, top_p, stop, seed."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"messages": messages, "stream": stream, **{k: v for k, v in sampling.items() if v is not None}}
        if model:
            body["model"] = model
        if stream:
            return self._stream_chat(body)
        answer = self.request("POST", "/v1/chat/completions", json=body)
        return answer["choices"][0]["message"]["content"]

    def _stream_chat(self, body: dict[str, Any]) -> Iterator[str]:
        for line in self.stream_lines("POST", "/v1/chat/completions", json=body):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # an error after streaming began comes as an event
                raise StudioError(500, str(chunk["error"].get("message", chunk["error"])))
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text


def _raise_for(response: httpx.Response) -> None:
    """StudioError with the message of the API's {"error": {"message": ...}} body (or FastAPI's
    {"detail": ...}, or the raw text) for any 4xx/5xx answer."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        detail = {k: v for k, v in error.items() if k != "message"}
        raise StudioError(response.status_code, str(error.get("message") or error), detail)
    message = body.get("detail") if isinstance(body, dict) and body.get("detail") else response.text[:500]
    raise StudioError(response.status_code, str(message or response.reason_phrase))


class Jobs:
    """Fine-tune jobs: `client.jobs.create(...)`, `.list()`, `.get(id)`, `.wait(id)`, `.logs(id)`, ..."""

    def __init__(self, client: StudioClient):
        self._c = client

    def create(self, config: Any = None, **values: Any) -> Job:
        """Submit a fine-tune: a TrainConfig, a dict, or its fields as keywords (keywords win), e.g.
        `create(data=upload.path, method="dpo", beta=0.1)`. `data` must be a file the Studio can read:
        upload it first with `client.datasets.upload`."""
        body: dict[str, Any] = {}
        if config is not None:
            body = config.model_dump(mode="json", exclude_none=True) if hasattr(config, "model_dump") else dict(config)
        body.update({k: v for k, v in values.items() if v is not None})
        return _pick(Job, self._c.request("POST", "/api/finetune/create", json=body))

    def plan(self, config: Any = None, **values: Any) -> dict[str, Any]:
        """The effective config (preset applied) and the memory estimate, without starting anything."""
        body = config.model_dump(mode="json", exclude_none=True) if hasattr(config, "model_dump") else dict(config or {})
        body.update({k: v for k, v in values.items() if v is not None})
        return self._c.request("POST", "/api/finetune/plan", json=body)

    def list(self) -> list[Job]:
        """Every job, newest first."""
        return [_pick(Job, job) for job in self._c.request("GET", "/api/finetune/tasks")]

    def get(self, task_id: str) -> Job:
        return _pick(Job, self._c.request("GET", f"/api/finetune/tasks/{task_id}"))

    def wait(self, task_id: str, on_progress: Callable[[Job], None] | None = None, timeout: float | None = None,
             poll_s: float = 1.0) -> Job:
        """Poll until the job ends and return it; `on_progress(job)` whenever its state changes.
        TimeoutError after `timeout` seconds (the job keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            job = self.get(task_id)
            state = (job.status, job.status_detail, job.step, job.progress, job.loss, job.error)
            if on_progress is not None and state != seen:
                on_progress(job)
            seen = state
            if job.done:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {task_id!r} is still {job.status} after {timeout:g} s; it keeps running "
                                   f"(client.jobs.cancel({task_id!r}) stops it)")
            time.sleep(poll_s)

    def logs(self, task_id: str, tail: int = 200) -> str:
        """The last `tail` lines of the job's log."""
        return self._c.request("GET", f"/api/finetune/tasks/{task_id}/logs", params={"tail": tail})["logs"]

    def follow_logs(self, task_id: str, poll_s: float = 1.0) -> Iterator[str]:
        """The log's lines as they are written; ends once the job has ended and every line is out."""
        # The route returns a tail, not an offset: count the lines already yielded and skip them.
        seen = 0
        while True:
            done = self.get(task_id).done
            lines = self.logs(task_id, tail=FULL_LOG_LINES).splitlines()
            if len(lines) < seen:  # the log was rewritten (a resumed job starts over): print it again
                seen = 0
            yield from lines[seen:]
            new = len(lines) > seen
            seen = len(lines)
            if done and not new:
                return
            if not new:
                time.sleep(poll_s)

    def cancel(self, task_id: str) -> Job:
        return _pick(Job, self._c.request("POST", f"/api/finetune/tasks/{task_id}/cancel"))

    def resume(self, task_id: str) -> Job:
        """Continue a failed or cancelled job from its last checkpoint."""
        return _pick(Job, self._c.request("POST", f"/api/finetune/tasks/{task_id}/resume"))

    def delete(self, task_id: str) -> None:
        """Remove a finished job with its files."""
        self._c.request("DELETE", f"/api/finetune/tasks/{task_id}")

    def compare(self, task_id: str, against: str | None = None, prompts: str | None = None, limit: int = 32,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The task's model and `against` (default: the served one) answer the task's held-out prompts
        (or those of `prompts`, a dataset file the Studio can read) greedily: per-example outputs
        side by side, each model's loss on the references and a summary. `on_progress` gets
        {"done", "total", "model"} as each answer is scored (the work runs on the cluster)."""
        body = {"against": against, "prompts": prompts, "limit": limit, "stream": True}
        for line in self._c.stream_lines("POST", f"/api/finetune/tasks/{task_id}/compare", json=body,
                                         timeout=httpx.Timeout(self._c._http.timeout.connect, read=None)):
            event = json.loads(line) if line.strip() else {}
            if "error" in event:
                error = event["error"]
                raise StudioError(error.get("status"), error.get("message", str(error)), error)
            if "progress" in event and on_progress is not None:
                on_progress(event["progress"])
            if "result" in event:
                return event["result"]
        raise StudioError(None, f"the comparison of {task_id!r} ended without a result")

    def merge(self, task_id: str) -> Model:
        """Merge a completed job's adapter into its base model; returns the merged model."""
        return _pick(Model, self._c.request("POST", f"/api/finetune/tasks/{task_id}/merge",
                                            timeout=max(self._c._http.timeout.read or 0, 600)))


class Models:
    """Models: `client.models.list()`, `.current()`, `.switch(ref)`, `.rollback()`, `.switches()`, `.wait_until_active(ref)`."""

    def __init__(self, client: StudioClient):
        self._c = client

    def list(self) -> list[Model]:
        """Base models first, then fine-tunes; `active` marks the one being served."""
        return [_pick(Model, m) for m in self._c.request("GET", "/api/finetune/models")]

    def current(self) -> CurrentModel:
        return _pick(CurrentModel, self._c.request("GET", "/api/finetune/current-model"))

    def switch(self, ref: str, timeout: float = SWITCH_TIMEOUT_S, require_better: bool = False,
               prompts: str | None = None, canary: str | None = None, weight: float | None = None) -> str:
        """Serve `ref` (a registry name, a task id or a path); returns the Studio's message:
        "switched and active", or "switched; takes effect when the LLM service starts".
        `require_better`: only if its held-out loss beats the served model's (on `prompts` if
        given); else StudioError(409) whose `detail["comparison"]` holds the figures.
        `canary` with `weight` (e.g. 0.1): that model answers this share of the requests that
        name no model (`current().raw["canary"]` shows it); a switch without one serves `ref` alone."""
        body = {"model_path": ref, "require_better": require_better, "prompts": prompts, "canary": canary,
                "weight": weight}
        answer = self._c.request("POST", "/api/finetune/switch-model", json=body,
                                 timeout=None if require_better else timeout)
        return answer["message"]

    def rollback(self, timeout: float = SWITCH_TIMEOUT_S) -> dict[str, Any]:
        """Serve again the model the latest switch replaced; the answer names both."""
        return self._c.request("POST", "/api/finetune/rollback", timeout=timeout)

    def switches(self, limit: int = 50) -> list[dict[str, Any]]:
        """Every change of the served model, newest first: who, when, from, to, a gated switch's figures."""
        return self._c.request("GET", "/api/finetune/switches", params={"limit": limit})

    def resolve(self, ref: str) -> str:
        """The registry name `ref` (a name, a task id or a path) stands for; `ref` itself if none."""
        models = self.list()
        for match in (lambda m: m.name == ref, lambda m: m.path == ref,
                      lambda m: m.task_id == ref and m.kind == "merged", lambda m: m.task_id == ref):
            found = next((m for m in models if match(m)), None)
            if found is not None:
                return found.name
        return ref

    def wait_until_active(self, ref: str, timeout: float = 600, poll_s: float = 0.5) -> CurrentModel:
        """Wait until `ref` is the active model; StudioError(422) if it failed to load, TimeoutError after `timeout`."""
        name = self.resolve(ref)
        deadline = time.monotonic() + timeout
        while True:
            current = self.current()
            if current.state == "active" and name in (current.name, current.path):
                return current
            if current.declared == name and current.state != "loading" and current.error:
                raise StudioError(422, current.error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ref!r} is not active after {timeout:g} s (now: {current.name}, "
                                   f"{current.state}); `sage studio logs` shows the LLM service's log")
            time.sleep(poll_s)


class Datasets:
    """Datasets: `client.datasets.upload(path)` validates and stores one in the Studio."""

    def __init__(self, client: StudioClient):
        self._c = client

    def upload(self, path: str | os.PathLike) -> Upload:
        """Send a JSON / JSONL dataset; StudioError(400) names the record and field of a bad one."""
        path = Path(path)
        with open(path, "rb") as f:
            answer = self._c.request("POST", "/api/finetune/upload-dataset",
                                     files={"file": (path.name, f, "application/json")})
        return _pick(Upload, answer)
