"""The registry's durable store: artifacts, fine-tune jobs and settings in one SQLite file.

Several processes (the registry actor, a CLI, a job, a test) may open the file at once: WAL
lets readers run beside the one writer, every write begins with `BEGIN IMMEDIATE` so a
read-modify-write holds the lock from its first read, and `busy_timeout` makes writers queue
instead of failing. Keep the file on a local disk (WAL does not work over NFS).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Iterator

from sage_ray.errors import (AlreadyExistsError, InUseError, NotFoundError,  # noqa: F401 (re-exported)
                             RegistryError, RegistryValueError)
from sage_ray.models import BUILTIN, DEMO_NAME, TINY_NAME
from sage_ray.registry.schema import (ARTIFACT_FIELDS, JOB_MUTABLE, JSON_FIELDS, MIGRATIONS, SCHEMA,  # noqa: F401
                                      ArtifactRecord, JobRecord, SwitchRecord)
from sage_ray.registry.status import RUNNING, STATUSES, TERMINAL, JobStatus  # noqa: F401 (re-exported)

KINDS = ("base", "lora", "merged")
RESERVED_NAMES = frozenset({*BUILTIN, TINY_NAME, DEMO_NAME})  # what `model: demo` / `tiny` must always mean
ACTIVE_MODEL_KEY = "active_model"
SERVING_KEY = "serving"
BUSY_TIMEOUT_MS = 30_000


PROGRESS_FIELDS = ("total_steps", "epoch", "progress", "loss", "tokens_per_s", "eta_s")
_MERGED_FIRST = "CASE kind WHEN 'merged' THEN 0 WHEN 'lora' THEN 1 ELSE 2 END"
_NOT_TERMINAL = f"status NOT IN ({', '.join(repr(str(s)) for s in sorted(TERMINAL))})"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def now_precise() -> str:
    """Microseconds: jobs queued within the same second still keep their order."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _encode(field: str, value: Any) -> Any:
    return json.dumps(value) if field in JSON_FIELDS and value is not None else value


def _decode(row: sqlite3.Row | None) -> dict[str, Any] | None:
    record = dict(row) if row is not None else None
    for field in JSON_FIELDS & set(record or ()):
        record[field] = json.loads(record[field]) if record[field] is not None else None
    return record


def _check(fields: Collection[str], allowed: Collection[str], what: str) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise RegistryValueError(f"unknown {what} field(s) {unknown}; allowed: {sorted(allowed)}")


def _check_choice(value: Any, choices: Collection[Any], field: str) -> None:
    if value not in choices:
        raise RegistryValueError(f"field {field!r}: {value!r} is not one of {list(choices)}")


class RegistryStore:
    """Artifacts, jobs and the active model in SQLite at `db_path`; one connection per thread."""

    def __init__(self, db_path: str | os.PathLike, *, read_only: bool = False):
        self.db_path = Path(db_path).expanduser()
        self.read_only = read_only
        self._local = threading.local()
        if read_only:  # a reader (the CLI without a cluster) never creates, migrates or writes the file
            return
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        # journal_mode is kept in the file: only the first opener switches it
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        with self._write() as conn:
            for statement in SCHEMA:
                conn.execute(statement)
            # stores written before the queue and shared storage existed: add their columns in place
            for table, column, kind in MIGRATIONS:
                if column not in {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def __reduce__(self):  # a copy sent to another process opens its own connections
        return (_reopen, (type(self), str(self.db_path), self.read_only))

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # never use a connection across a fork
            target = f"file:{self.db_path}?mode=ro" if self.read_only else self.db_path
            conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   uri=self.read_only)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # In WAL mode NORMAL keeps every commit through a crash of any process; only a power
            # cut may lose the last few, a fair price for not syncing on each progress report.
            conn.execute("PRAGMA synchronous = NORMAL")
            local.conn, local.pid = conn, os.getpid()
        return local.conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT too: never leave the connection mid-transaction
                conn.execute("ROLLBACK")
            raise

    def _one(self, conn: sqlite3.Connection, table: str, key: str, value: str) -> dict[str, Any] | None:
        return _decode(conn.execute(f"SELECT * FROM {table} WHERE {key} = ?", (value,)).fetchone())

    def upsert_artifact(self, record: ArtifactRecord, *, replace: bool = True) -> ArtifactRecord:
        """Add an artifact or update the given fields of the one with that name (`replace=False`
        refuses a taken name instead); created_at defaults to now on insert."""
        _check(record, ARTIFACT_FIELDS, "artifact")
        name = record.get("name")
        if not isinstance(name, str) or not name or name != name.strip() or len(name) > 256:
            raise RegistryValueError(f"artifact name {name!r}: give 1-256 characters, no surrounding spaces")
        if not record.get("path"):
            raise RegistryValueError(f"artifact {name!r} needs a path")
        _check_choice(record.get("kind"), KINDS, "kind")
        _check_choice(record.get("chat_template"), ("model", "default", None), "chat_template")
        row = {"created_at": now_iso(), **record, "path": os.fspath(record["path"])}
        sql = f"INSERT INTO artifacts ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
        if replace:  # only the fields given change, so an upsert never erases metrics it lacks
            updates = ", ".join(f"{c} = excluded.{c}" for c in record if c != "name")
            sql += f" ON CONFLICT (name) DO UPDATE SET {updates}"
        with self._write() as conn:
            try:
                conn.execute(sql, [_encode(c, v) for c, v in row.items()])
            except sqlite3.IntegrityError as err:
                raise AlreadyExistsError(f"an artifact named {name!r} already exists; pick another name") from err
            return self._one(conn, "artifacts", "name", name)

    def get_artifact(self, name: str) -> ArtifactRecord | None:
        """The artifact called `name`, or None."""
        return self._one(self._conn(), "artifacts", "name", name)

    def list_artifacts(self, kind: str | None = None, task_id: str | None = None) -> list[ArtifactRecord]:
        """Artifacts, newest first; a task's merged model comes before its adapter."""
        if kind is not None:
            _check_choice(kind, KINDS, "kind")
        sql = ("SELECT * FROM artifacts WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR task_id = ?2) "
               f"ORDER BY created_at DESC, {_MERGED_FIRST}, name")
        return [_decode(r) for r in self._conn().execute(sql, (kind, task_id))]

    def get_task_model(self, task_id: str) -> ArtifactRecord | None:
        """"The" model of a task: its merged model when there is one, else its adapter."""
        sql = f"SELECT * FROM artifacts WHERE task_id = ? AND kind != 'base' ORDER BY {_MERGED_FIRST}, name"
        return _decode(self._conn().execute(sql, (task_id,)).fetchone())

    def delete_artifact(self, name: str) -> None:
        """Forget an artifact (its files stay); refused while it is the active model."""
        with self._write() as conn:
            row = self._one(conn, "artifacts", "name", name)
            if row is None:
                raise NotFoundError(f"no artifact named {name!r}; `sage llm model show` lists them")
            self._refuse_active(conn, [row])
            conn.execute("DELETE FROM artifacts WHERE name = ?", (name,))

    def _refuse_active(self, conn: sqlite3.Connection, artifacts: list[dict[str, Any]]) -> None:
        active = self._setting(conn, ACTIVE_MODEL_KEY)
        for artifact in artifacts:
            if active is not None and active in (artifact["name"], artifact["path"]):
                raise InUseError(f"artifact {artifact['name']!r} is the Studio's active model; switch to "
                                 "another model first (POST /api/finetune/switch-model), then delete it")

    def create_job(self, task_id: str, *, config: dict[str, Any] | None = None, ray_job_id: str | None = None,
                   status: str = JobStatus.QUEUED, status_detail: str | None = None,
                   log_path: str | None = None) -> JobRecord:
        """Record a new job; refused when the task id is taken, by a job, a built-in model's name
        or another model's registry name: the task's models are registered under its id, and
        must never replace what a client asking for that name expects."""
        _check_choice(status, STATUSES, "status")
        if task_id in RESERVED_NAMES:
            raise AlreadyExistsError(f"{task_id!r} is the name of a built-in model; pick another --name")
        row = {"task_id": task_id, "ray_job_id": ray_job_id, "config": config, "status": status,
               "status_detail": status_detail, "log_path": log_path, "created_at": now_iso(),
               "queued_at": now_precise() if status == JobStatus.QUEUED else None}
        with self._write() as conn:
            owner = conn.execute("SELECT task_id, kind FROM artifacts WHERE name = ?", (task_id,)).fetchone()
            if owner is not None and owner["task_id"] != task_id:
                raise AlreadyExistsError(f"{task_id!r} is the registry name of a {owner['kind']} model already; "
                                         "pick another --name (sage llm model show lists the names)")
            try:
                conn.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             [_encode(k, v) for k, v in row.items()])
            except sqlite3.IntegrityError as err:
                raise AlreadyExistsError(f"a job with task id {task_id!r} already exists; "
                                         "pick another --name or delete the old job") from err
            return self._one(conn, "jobs", "task_id", task_id)

    def update_job(self, task_id: str, *, only_if: Collection[str] | None = None, owner: str | None = None,
                   **fields: Any) -> JobRecord | None:
        """Set job fields. A status change clears status_detail and stamps started_at / finished_at
        unless given; leaving a terminal status (resume) clears finished_at and error. With
        `only_if`, a compare-and-set: nothing changes and None comes back unless the status is one
        of those (so a cancel and a monitor that sees the job finish cannot both win). With
        `owner` (a Ray job submission id), likewise unless the record still belongs to that
        submission: the late words of a stopped run never touch its resumed successor."""
        _check(fields, JOB_MUTABLE, "job")
        if "status" in fields:
            _check_choice(fields["status"], STATUSES, "status")
        with self._write() as conn:
            current = self._one(conn, "jobs", "task_id", task_id)
            if current is None:
                raise NotFoundError(f"no job with task id {task_id!r}; `sage finetune list` shows them")
            if only_if is not None and current["status"] not in only_if:
                return None
            if owner is not None and current["ray_job_id"] not in (owner, None):
                return None
            values = {**_implied_by_status(current, fields.get("status")), **fields}
            if values:
                conn.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE task_id = ?",
                             [*(_encode(k, v) for k, v in values.items()), task_id])
            return self._one(conn, "jobs", "task_id", task_id)

    def report_progress(self, task_id: str, event: dict[str, Any]) -> bool:
        """Apply one ProgressCallback event in one statement: append [step, loss], set the live
        fields, move a queued/preparing job to training. Ignored (False) when its step is not past
        the stored one or the job has finished: late or repeated reports never move a job back."""
        step = event.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise RegistryValueError(f"a progress event needs an integer 'step', got {step!r}")
        if event.get("event") == "eval":
            return self._report_eval(task_id, step, event)
        values = {k: event[k] for k in PROGRESS_FIELDS if k in event}
        if values.get("progress") is not None:
            values["progress"] = min(100.0, max(0.0, float(values["progress"])))
        loss = event.get("loss")
        # a preference run's metrics (reward accuracy, margins) ride along: [step, loss, {name: value}]
        point = json.dumps([step, loss] + ([event["metrics"]] if event.get("metrics") else []))
        # SET expressions all read the row as it was, so status and status_detail agree
        sql = (f"UPDATE jobs SET step = ?{''.join(f', {k} = ?' for k in values)}, "
               "loss_history = CASE WHEN ? IS NULL THEN loss_history "
               "ELSE json_insert(loss_history, '$[#]', json(?)) END, "
               "status_detail = CASE WHEN status IN ('queued', 'preparing') THEN NULL ELSE status_detail END, "
               "status = CASE WHEN status IN ('queued', 'preparing') THEN 'training' ELSE status END, "
               f"started_at = COALESCE(started_at, ?) "
               f"WHERE task_id = ? AND {_NOT_TERMINAL} AND (step IS NULL OR step < ?)")
        with self._write() as conn:
            if conn.execute(sql, [step, *values.values(), loss, point, now_iso(), task_id, step]).rowcount:
                return True
            if self._one(conn, "jobs", "task_id", task_id) is None:
                raise NotFoundError(f"no job with task id {task_id!r} to report progress to; create_job first")
            return False

    def _report_eval(self, task_id: str, step: int, event: dict[str, Any]) -> bool:
        """Append [step, eval loss, token accuracy] to eval_history unless its step is not past
        the last evaluation's (a repeated report) or the job has finished."""
        loss = event.get("eval_loss")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            raise RegistryValueError(f"an eval event needs a number 'eval_loss', got {loss!r}")
        point = json.dumps([step, loss, event.get("eval_token_accuracy")])
        sql = ("UPDATE jobs SET eval_history = json_insert(eval_history, '$[#]', json(?)) "
               f"WHERE task_id = ? AND {_NOT_TERMINAL} "
               "AND COALESCE(json_extract(eval_history, '$[#-1][0]') < ?, 1)")
        with self._write() as conn:
            if conn.execute(sql, [point, task_id, step]).rowcount:
                return True
            if self._one(conn, "jobs", "task_id", task_id) is None:
                raise NotFoundError(f"no job with task id {task_id!r} to report an evaluation to")
            return False

    def rewind_progress(self, task_id: str, step: int) -> JobRecord:
        """Set a job back to `step` (resuming from a checkpoint) and drop the loss history after
        it, so that the resumed run's reports are accepted again."""
        with self._write() as conn:
            job = self._one(conn, "jobs", "task_id", task_id)
            if job is None:
                raise NotFoundError(f"no job with task id {task_id!r}")
            history = [point for point in job["loss_history"] if point[0] <= step]
            evals = [point for point in job["eval_history"] if point[0] <= step]
            total = job["total_steps"]
            conn.execute("UPDATE jobs SET step = ?, loss_history = ?, eval_history = ?, loss = ?, progress = ? "
                         "WHERE task_id = ?",
                         (step, json.dumps(history), json.dumps(evals), history[-1][1] if history else None,
                          min(100.0, 100.0 * step / total) if total else 0.0, task_id))
            return self._one(conn, "jobs", "task_id", task_id)

    def get_job(self, task_id: str) -> JobRecord | None:
        """The job with `task_id`, or None."""
        return self._one(self._conn(), "jobs", "task_id", task_id)

    def list_jobs(self, status: str | Collection[str] | None = None) -> list[JobRecord]:
        """Jobs, newest first; only those in `status` (one or several) when given."""
        wanted = [status] if isinstance(status, str) else list(status or ())
        for value in wanted:
            _check_choice(value, STATUSES, "status")
        where = f"WHERE status IN ({', '.join('?' * len(wanted))})" if wanted else ""
        return [_decode(r) for r in self._conn().execute(
            f"SELECT * FROM jobs {where} ORDER BY created_at DESC, rowid DESC", wanted)]

    def delete_job(self, task_id: str, *, with_artifacts: bool = False, force: bool = False) -> None:
        """Forget a finished job, and its artifacts' records when asked (files stay). Refused
        while it runs unless `force`, and while one of its artifacts is the active model."""
        with self._write() as conn:
            job = self._one(conn, "jobs", "task_id", task_id)
            if job is None:
                raise NotFoundError(f"no job with task id {task_id!r}")
            if job["status"] not in TERMINAL and not force:
                raise InUseError(f"job {task_id!r} is {job['status']}; cancel it first: sage finetune cancel {task_id}")
            if with_artifacts:
                owned = conn.execute("SELECT name, path FROM artifacts WHERE task_id = ?", (task_id,))
                self._refuse_active(conn, [dict(r) for r in owned])
                conn.execute("DELETE FROM artifacts WHERE task_id = ?", (task_id,))
            conn.execute("DELETE FROM jobs WHERE task_id = ?", (task_id,))

    def set_active_model(self, name_or_path: str | None) -> None:
        """Remember the Studio's active model (a registry name, task id or path); None clears it."""
        if name_or_path is not None and (not isinstance(name_or_path, str) or not name_or_path.strip()):
            raise RegistryValueError(f"the active model must be a non-empty name or path, got {name_or_path!r}")
        with self._write() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         (ACTIVE_MODEL_KEY, json.dumps(name_or_path)))

    def get_active_model(self) -> str | None:
        """The Studio's active model as it was set, or None."""
        return self._setting(self._conn(), ACTIVE_MODEL_KEY)

    def set_serving(self, state: dict[str, Any]) -> None:
        """Record what the LLM service serves (model, state, last load error) for every reader."""
        with self._write() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         (SERVING_KEY, json.dumps(state)))

    def get_serving(self) -> dict[str, Any] | None:
        """The LLM service's last recorded state, or None before it ever reported."""
        return self._setting(self._conn(), SERVING_KEY)

    def record_switch(self, action: str, to_model: str, *, from_model: str | None = None, who: str | None = None,
                      figures: dict[str, Any] | None = None) -> SwitchRecord:
        """Remember one change of the served model (a switch or a rollback), stamped now."""
        _check_choice(action, ("switch", "rollback"), "action")
        row = {"at": now_precise(), "who": who, "action": action, "from_model": from_model, "to_model": to_model,
               "figures": figures}
        with self._write() as conn:
            cursor = conn.execute(f"INSERT INTO switches ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                  [_encode(k, v) for k, v in row.items()])
            return self._one(conn, "switches", "id", cursor.lastrowid)

    def list_switches(self, limit: int = 50) -> list[SwitchRecord]:
        """The latest changes of the served model, newest first."""
        rows = self._conn().execute("SELECT * FROM switches ORDER BY id DESC LIMIT ?", (limit,))
        return [_decode(r) for r in rows]

    @staticmethod
    def _setting(conn: sqlite3.Connection, key: str) -> Any:
        row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row and row["value"] is not None else None


def _reopen(cls, db_path: str, read_only: bool) -> "RegistryStore":
    return cls(db_path, read_only=read_only)


def _implied_by_status(current: dict[str, Any], new: str | None) -> dict[str, Any]:
    """What a status change implies; fields the caller gives override it."""
    old = current["status"]
    if new is None or new == old:
        return {}
    implied: dict[str, Any] = {"status_detail": None}
    if new == JobStatus.QUEUED:  # back in the queue (resumed): behind the jobs already waiting
        implied["queued_at"] = now_precise()
    if new in RUNNING and current["started_at"] is None:
        implied["started_at"] = now_iso()
    if new in TERMINAL:
        implied["finished_at"] = now_iso()
    elif old in TERMINAL:
        implied.update(finished_at=None, error=None)
    return implied
