"""The registry's records (what each row holds) and the SQLite schema that stores them."""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class ArtifactRecord(TypedDict, total=False):
    name: str  # unique: what users pick a model by
    kind: Literal["base", "lora", "merged"]
    path: str
    uri: str | None  # its shared copy (SAGE_STORAGE), which a node without `path` fetches
    base_model: str | None
    task_id: str | None
    created_at: str
    size_bytes: int | None
    chat_template: Literal["model", "default"] | None  # the model's own template, or ours
    lora_rank: int | None
    target_modules: list[str] | str | None
    metrics: dict[str, Any] | None


class JobRecord(TypedDict, total=False):
    task_id: str
    ray_job_id: str | None
    config: dict[str, Any] | None
    status: str  # one of STATUSES
    status_detail: str | None  # e.g. "waiting for resources"
    progress: float  # 0-100
    epoch: float | None
    step: int | None
    total_steps: int | None
    loss: float | None
    loss_history: list[list]  # [[step, loss] or [step, loss, {metric: value}], ...], steps increasing
    eval_history: list[list]  # [[step, eval loss, token accuracy or None], ...], steps increasing
    tokens_per_s: float | None
    eta_s: float | None
    error: str | None
    log_path: str | None
    created_at: str
    queued_at: str | None  # when it last entered the queue: waiting jobs start in this order
    started_at: str | None
    finished_at: str | None


class SwitchRecord(TypedDict, total=False):
    id: int
    at: str
    who: str | None  # the API key's holder, or the client's address: whoever asked
    action: Literal["switch", "rollback"]
    from_model: str | None  # the active model before (None: the Studio's default)
    to_model: str
    figures: dict[str, Any] | None  # a gated switch's comparison summary


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS artifacts (name TEXT PRIMARY KEY, kind TEXT NOT NULL, path TEXT NOT NULL,
        base_model TEXT, task_id TEXT, created_at TEXT NOT NULL, size_bytes INTEGER, chat_template TEXT,
        lora_rank INTEGER, target_modules TEXT, metrics TEXT, uri TEXT)""",
    "CREATE INDEX IF NOT EXISTS artifacts_task ON artifacts (task_id)",
    """CREATE TABLE IF NOT EXISTS jobs (task_id TEXT PRIMARY KEY, ray_job_id TEXT, config TEXT,
        status TEXT NOT NULL, status_detail TEXT, progress REAL NOT NULL DEFAULT 0, epoch REAL, step INTEGER,
        total_steps INTEGER, loss REAL, loss_history TEXT NOT NULL DEFAULT '[]', tokens_per_s REAL, eta_s REAL,
        error TEXT, log_path TEXT, created_at TEXT NOT NULL, queued_at TEXT, started_at TEXT, finished_at TEXT,
        eval_history TEXT NOT NULL DEFAULT '[]')""",
    "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT)",
    """CREATE TABLE IF NOT EXISTS switches (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, who TEXT,
        action TEXT NOT NULL, from_model TEXT, to_model TEXT NOT NULL, figures TEXT)""",
    "PRAGMA user_version = 1",  # the schema's version, for later migrations
)
# Columns added after a store's first version: (table, column, SQL type), added in place on open.
MIGRATIONS = (("jobs", "queued_at", "TEXT"), ("artifacts", "uri", "TEXT"),
              ("jobs", "eval_history", "TEXT NOT NULL DEFAULT '[]'"))
ARTIFACT_FIELDS = frozenset(ArtifactRecord.__annotations__)
JOB_MUTABLE = frozenset(JobRecord.__annotations__) - {"task_id", "created_at"}
JSON_FIELDS = frozenset({"target_modules", "metrics", "config", "loss_history", "eval_history", "figures"})
