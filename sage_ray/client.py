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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from sage_ray import env

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("completed", "failed", "cancelled")
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


def _pick(cls, values: dict[str, Any]):
    """An instance of dataclass `cls` from a JSON object: known fields taken, the whole object kept as `raw`."""
    names = {f.name for f in fields(cls)} - {"raw"}
    return cls(**{k: v for k, v in values.items() if k in names}, raw=values)


@dataclass
class Job:
    """A fine-tune task as the Studio reports it."""

    task_id: str
    status: str
    progress: float = 0.0
    status_detail: str | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    error: str | None = None
    config: dict[str, Any] | None = None
    created_at: str | None = None
    finished_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        """True once the job has ended: completed, failed or cancelled."""
        return self.status in TERMINAL

    @property
    def method(self) -> str:
        """sft, dpo, orpo or kto."""
        return (self.config or {}).get("method", "sft")

    @property
    def metrics(self) -> dict[str, float]:
        """The latest preference metrics (rewards/accuracies, rewards/margins, ...); empty for sft."""
        history = self.raw.get("loss_history") or []
        return next((point[2] for point in reversed(history) if len(point) > 2), {})


@dataclass
class Model:
    """A model the Studio can serve: a base model, a LoRA adapter or a merged fine-tune."""

    name: str
    kind: str
    path: str
    base_model: str | None = None
    task_id: str | None = None
    group: str | None = None  # "base" or "finetuned"
    active: bool = False
    created_at: str | None = None
    size_bytes: int | None = None
    uri: str | None = None  # its shared copy (SAGE_STORAGE), fetched by nodes without `path`
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class CurrentModel:
    """What the LLM service serves now; `state` is active, loading, starting or "not serving"."""

    name: str
    state: str
    kind: str | None = None
    path: str | None = None
    base_model: str | None = None
    declared: str | None = None
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Upload:
    """A dataset the Studio accepted: where it keeps it (pass `path` as a job's `data`) and a preview."""

    path: str
    filename: str
    records: int
    format: str
    kind: str = "sft"
    """What the records train: "sft", "pairs" (for method dpo / orpo / kto) or "labelled" (kto)."""
    sha256: str | None = None
    preview: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


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
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # an error after streaming began comes as an event
                        raise StudioError(500, str(chunk["error"].get("message", chunk["error"])))
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise self._unreachable(err) from None


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

    def merge(self, task_id: str) -> Model:
        """Merge a completed job's adapter into its base model; returns the merged model."""
        return _pick(Model, self._c.request("POST", f"/api/finetune/tasks/{task_id}/merge",
                                            timeout=max(self._c._http.timeout.read or 0, 600)))


class Models:
    """Models: `client.models.list()`, `.current()`, `.switch(ref)`, `.wait_until_active(ref)`."""

    def __init__(self, client: StudioClient):
        self._c = client

    def list(self) -> list[Model]:
        """Base models first, then fine-tunes; `active` marks the one being served."""
        return [_pick(Model, m) for m in self._c.request("GET", "/api/finetune/models")]

    def current(self) -> CurrentModel:
        return _pick(CurrentModel, self._c.request("GET", "/api/finetune/current-model"))

    def switch(self, ref: str, timeout: float = SWITCH_TIMEOUT_S) -> str:
        """Serve `ref` (a registry name, a task id or a path); returns the Studio's message:
        "switched and active", or "switched; takes effect when the LLM service starts"."""
        answer = self._c.request("POST", "/api/finetune/switch-model", json={"model_path": ref}, timeout=timeout)
        return answer["message"]

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
