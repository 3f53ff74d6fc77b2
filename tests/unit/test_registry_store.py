"""The registry's SQLite store without Ray: records, rules, and concurrent writers from
several threads and processes."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from sage_ray.registry.store import (AlreadyExistsError, InUseError, NotFoundError, RegistryStore,
                                     RegistryValueError)


@pytest.fixture
def store(tmp_path: Path) -> RegistryStore:
    return RegistryStore(tmp_path / "registry.db")


def event(step: int, loss: float | None = 1.0, total: int = 100) -> dict:
    """The shape ProgressCallback emits."""
    return {"event": "progress", "step": step, "total_steps": total, "epoch": step / total,
            "progress": 100.0 * step / total, "loss": loss, "learning_rate": 1e-4,
            "tokens_per_s": 50.0, "eta_s": 10.0}


def test_artifact_crud_and_json_fields(store: RegistryStore, tmp_path: Path):
    store.upsert_artifact({"name": "t1", "kind": "merged", "path": "/m/t1", "task_id": "t1",
                           "metrics": {"final_loss": 0.5}, "target_modules": ["q_proj", "v_proj"],
                           "lora_rank": 8, "chat_template": "model", "size_bytes": 123})
    store.upsert_artifact({"name": "t1-lora", "kind": "lora", "path": "/m/t1/lora", "task_id": "t1"})
    store.upsert_artifact({"name": "qwen", "kind": "base", "path": "/models/qwen"})

    got = store.get_artifact("t1")
    assert got["metrics"] == {"final_loss": 0.5} and got["target_modules"] == ["q_proj", "v_proj"]
    assert got["created_at"] and got["size_bytes"] == 123
    assert store.get_artifact("nope") is None
    assert [a["name"] for a in store.list_artifacts(kind="base")] == ["qwen"]
    assert [a["name"] for a in store.list_artifacts(task_id="t1")] == ["t1", "t1-lora"]  # merged first
    assert store.get_task_model("t1")["kind"] == "merged"

    # an upsert changes only the fields it gives: metrics and created_at stay
    updated = store.upsert_artifact({"name": "t1", "kind": "merged", "path": "/m2/t1"})
    assert updated["path"] == "/m2/t1" and updated["metrics"] == {"final_loss": 0.5}
    assert updated["created_at"] == got["created_at"]

    store.delete_artifact("t1")
    assert store.get_task_model("t1")["name"] == "t1-lora"
    with pytest.raises(NotFoundError):
        store.delete_artifact("t1")
    # durable: a second store on the same file (another process, a new actor) sees it all
    assert {a["name"] for a in RegistryStore(tmp_path / "registry.db").list_artifacts()} == {"t1-lora", "qwen"}


def test_names_are_unique(store: RegistryStore):
    store.upsert_artifact({"name": "a", "kind": "lora", "path": "/a"})
    store.upsert_artifact({"name": "a", "kind": "lora", "path": "/a2"})
    assert len(store.list_artifacts()) == 1
    with pytest.raises(AlreadyExistsError, match="already exists"):
        store.upsert_artifact({"name": "a", "kind": "merged", "path": "/b"}, replace=False)
    assert store.get_artifact("a")["path"] == "/a2"


@pytest.mark.parametrize("record, message", [
    ({"name": "x", "kind": "adapter", "path": "/x"}, "kind"),
    ({"name": "x", "kind": "lora"}, "path"),
    ({"name": " x", "kind": "lora", "path": "/x"}, "name"),
    ({"name": "x", "kind": "lora", "path": "/x", "colour": "red"}, "colour"),
    ({"name": "x", "kind": "lora", "path": "/x", "chat_template": "mine"}, "chat_template"),
])
def test_invalid_artifacts_are_refused(store: RegistryStore, record: dict, message: str):
    with pytest.raises(RegistryValueError, match=message):
        store.upsert_artifact(record)


def test_deleting_the_active_model_is_refused(store: RegistryStore):
    store.upsert_artifact({"name": "t1", "kind": "merged", "path": "/m/t1", "task_id": "t1"})
    store.upsert_artifact({"name": "t2", "kind": "lora", "path": "/m/t2", "task_id": "t2"})
    assert store.get_active_model() is None
    store.set_active_model("t1")
    assert store.get_active_model() == "t1"
    with pytest.raises(InUseError, match="active model"):
        store.delete_artifact("t1")
    store.set_active_model("/m/t2")  # a path names the artifact too
    with pytest.raises(InUseError):
        store.delete_artifact("t2")
    store.create_job("t2", status="completed")
    with pytest.raises(InUseError):
        store.delete_job("t2", with_artifacts=True)
    assert store.get_job("t2") is not None  # refused as a whole
    store.delete_artifact("t1")
    store.set_active_model(None)
    store.delete_job("t2", with_artifacts=True)
    assert store.list_artifacts() == [] and store.get_job("t2") is None


def test_job_lifecycle_and_fields(store: RegistryStore):
    job = store.create_job("t1", config={"epochs": 1}, ray_job_id="t1", status_detail="waiting for resources")
    assert job["status"] == "queued" and job["progress"] == 0 and job["loss_history"] == []
    with pytest.raises(AlreadyExistsError):
        store.create_job("t1")
    with pytest.raises(RegistryValueError, match="colour"):
        store.update_job("t1", colour="red")
    with pytest.raises(RegistryValueError, match="status"):
        store.update_job("t1", status="running")
    with pytest.raises(NotFoundError):
        store.update_job("nope", status="failed")

    job = store.update_job("t1", status="preparing")
    assert job["started_at"] and job["status_detail"] is None and job["config"] == {"epochs": 1}
    job = store.update_job("t1", status="failed", error="CUDA out of memory")
    assert job["finished_at"] and job["error"] == "CUDA out of memory"
    # compare-and-set: a cancel that comes after the failure does not overwrite it
    assert store.update_job("t1", only_if=("queued", "preparing", "training"), status="cancelled") is None
    assert store.get_job("t1")["status"] == "failed"
    job = store.update_job("t1", status="queued")  # resume
    assert job["finished_at"] is None and job["error"] is None
    with pytest.raises(InUseError, match="cancel it first"):
        store.delete_job("t1")
    store.delete_job("t1", force=True)
    with pytest.raises(NotFoundError):
        store.delete_job("t1")


def test_list_jobs_by_status(store: RegistryStore):
    for task_id, status in [("a", "queued"), ("b", "training"), ("c", "completed")]:
        store.create_job(task_id, status=status)
    assert [j["task_id"] for j in store.list_jobs()] == ["c", "b", "a"]  # newest first
    assert [j["task_id"] for j in store.list_jobs("training")] == ["b"]
    assert {j["task_id"] for j in store.list_jobs(["queued", "completed"])} == {"a", "c"}


def test_progress_is_monotonic_and_terminal_states_stay(store: RegistryStore):
    store.create_job("t1", status_detail="waiting for resources")
    assert store.report_progress("t1", event(1, 2.0))
    job = store.get_job("t1")
    assert job["status"] == "training" and job["status_detail"] is None and job["started_at"]
    assert store.report_progress("t1", event(3, 1.5))
    assert not store.report_progress("t1", event(2, 9.9))  # late
    assert not store.report_progress("t1", event(3, 9.9))  # repeated
    assert store.report_progress("t1", event(4, None))  # no loss: no history point
    job = store.get_job("t1")
    assert job["step"] == 4 and job["loss"] is None and job["progress"] == 4.0 and job["tokens_per_s"] == 50.0
    assert job["loss_history"] == [[1, 2.0], [3, 1.5]]

    store.update_job("t1", status="merging")
    assert store.report_progress("t1", event(5, 1.0))
    assert store.get_job("t1")["status"] == "merging"  # progress never changes a later phase back
    store.update_job("t1", status="cancelled")
    assert not store.report_progress("t1", event(6, 1.0))
    job = store.get_job("t1")
    assert job["status"] == "cancelled" and job["step"] == 5

    job = store.rewind_progress("t1", 3)  # resume from checkpoint 3
    assert job["step"] == 3 and job["loss_history"] == [[1, 2.0], [3, 1.5]] and job["loss"] == 1.5
    with pytest.raises(NotFoundError):
        store.report_progress("nope", event(1))


def test_preference_metrics_ride_along_in_the_loss_history(store: RegistryStore):
    store.create_job("dpo")
    metrics = {"rewards/accuracies": 0.75, "rewards/margins": 0.12}
    assert store.report_progress("dpo", {**event(1, 0.69), "metrics": metrics})
    assert store.report_progress("dpo", event(2, 0.6))
    assert store.get_job("dpo")["loss_history"] == [[1, 0.69, metrics], [2, 0.6]]
    with pytest.raises(RegistryValueError):
        store.report_progress("t1", {"loss": 1.0})


# ---- concurrency: module-level so that spawned processes can import it ----

WORKERS_PER_KIND = 3
EVENTS = 150


def wait_for_all(folder: Path, worker: int, workers: int) -> None:
    """A barrier across threads and processes, so that every writer really runs at once."""
    (folder / f"ready-{worker}").touch()
    deadline = time.monotonic() + 60
    while len(list(folder.glob("ready-*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.005)


def write_many(db_path: str, worker: int) -> tuple[int, float, float]:
    """Report EVENTS steps to this worker's own job and to the shared one; plain updates in
    between. Returns how many shared-job reports were accepted, and when it started and ended."""
    store = RegistryStore(db_path)
    workers = 2 * WORKERS_PER_KIND
    wait_for_all(Path(db_path).parent, worker, workers)
    accepted, started = 0, time.time()
    for i in range(1, EVENTS + 1):
        assert store.report_progress(f"own-{worker}", event(i, 1.0 / i, total=EVENTS))
        # steps unique across workers: a report overtaken by another worker's is ignored
        accepted += store.report_progress("shared", event(i * workers + worker, float(worker), total=10**6))
        store.update_job(f"own-{worker}", status_detail=f"update {i}", eta_s=float(i))
    return accepted, started, time.time()


def test_concurrent_threads_and_processes_lose_no_update(store: RegistryStore):
    workers = 2 * WORKERS_PER_KIND
    for worker in range(workers):
        store.create_job(f"own-{worker}")
    store.create_job("shared")
    done = threading.Event()
    read_errors: list[str] = []

    def read() -> int:
        last_step, last_len, reads = -1, -1, 0
        while not done.is_set():
            job = store.get_job("shared")
            step, length = job["step"] or 0, len(job["loss_history"])
            if step < last_step or length < last_len:
                read_errors.append(f"went back: step {last_step}->{step}, history {last_len}->{length}")
            last_step, last_len, reads = step, length, reads + 1
            assert len(store.list_jobs()) == workers + 1
        return reads

    db = str(store.db_path)
    spawn = multiprocessing.get_context("spawn")  # fork is unsafe once Ray or threads run here
    with ProcessPoolExecutor(WORKERS_PER_KIND, mp_context=spawn) as procs, \
            ThreadPoolExecutor(WORKERS_PER_KIND + 2) as threads:
        readers = [threads.submit(read) for _ in range(2)]
        futures = [procs.submit(write_many, db, w) for w in range(WORKERS_PER_KIND)]
        futures += [threads.submit(write_many, db, w) for w in range(WORKERS_PER_KIND, workers)]
        results = [f.result(timeout=120) for f in futures]
        done.set()
        assert all(r.result() > 0 for r in readers)

    assert max(start for _, start, _ in results) < min(end for _, _, end in results), "writers did not overlap"
    accepted = sum(n for n, _, _ in results)

    assert read_errors == []
    for worker in range(workers):
        job = store.get_job(f"own-{worker}")
        assert job["step"] == EVENTS and len(job["loss_history"]) == EVENTS
        assert [s for s, _ in job["loss_history"]] == list(range(1, EVENTS + 1))
        assert job["status_detail"] == f"update {EVENTS}" and job["eta_s"] == EVENTS
    shared = store.get_job("shared")
    steps = [s for s, _ in shared["loss_history"]]
    assert len(steps) == accepted and steps == sorted(set(steps))  # every accepted report is there, in order
    assert shared["step"] == EVENTS * workers + workers - 1  # the largest step always wins


def test_a_store_from_before_the_queue_gains_its_new_columns(tmp_path: Path):
    import sqlite3

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute("""CREATE TABLE jobs (task_id TEXT PRIMARY KEY, ray_job_id TEXT, config TEXT,
        status TEXT NOT NULL, status_detail TEXT, progress REAL NOT NULL DEFAULT 0, epoch REAL, step INTEGER,
        total_steps INTEGER, loss REAL, loss_history TEXT NOT NULL DEFAULT '[]', tokens_per_s REAL, eta_s REAL,
        error TEXT, log_path TEXT, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT)""")
    conn.execute("INSERT INTO jobs (task_id, status, created_at) VALUES ('old', 'failed', '2024-01-01T00:00:00+00:00')")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(db)
    conn.execute("""CREATE TABLE artifacts (name TEXT PRIMARY KEY, kind TEXT NOT NULL, path TEXT NOT NULL,
        base_model TEXT, task_id TEXT, created_at TEXT NOT NULL, size_bytes INTEGER, chat_template TEXT,
        lora_rank INTEGER, target_modules TEXT, metrics TEXT)""")
    conn.execute("INSERT INTO artifacts (name, kind, path, created_at) VALUES ('m', 'base', '/m', '2024-01-01')")
    conn.commit()
    conn.close()
    store = RegistryStore(db)
    assert store.get_job("old")["queued_at"] is None
    assert store.get_artifact("m")["uri"] is None  # and shared storage's column
    assert store.upsert_artifact({"name": "m", "kind": "base", "path": "/m", "uri": "s3://b/m"})["uri"] == "s3://b/m"
    first = store.update_job("old", status="queued")  # resumed: back in the queue, at the end
    later = store.create_job("new")
    assert first["queued_at"] < later["queued_at"]


def test_queue_decisions():
    from sage_ray.registry.queue import concurrency_limit, decide, worker_demand

    need = worker_demand({"num_workers": 2, "cpus_per_worker": 1.5, "use_gpu": True})
    assert need == {"CPU": 3.0, "GPU": 2.0}
    room = {"CPU": 4.0, "GPU": 2.0}
    assert decide(need, ahead=0, running=0, limit=None, available=room, claimed={}, total=room).granted
    ahead = decide(need, ahead=1, running=0, limit=None, available=room, claimed={}, total=room)
    assert not ahead.granted and ahead.detail == "waiting for resources: 1 job(s) ahead in the queue"
    full = decide(need, ahead=0, running=2, limit=2, available=room, claimed={}, total=room)
    assert not full.granted and "2 of 2 concurrent jobs running (SAGE_MAX_CONCURRENT_JOBS)" in full.detail
    claimed = decide(need, ahead=0, running=1, limit=None, available=room, claimed={"GPU": 1.0}, total=room)
    assert not claimed.granted and claimed.detail == "waiting for resources: needs 2 GPU, 1 free"
    never = decide(need, ahead=0, running=0, limit=None, available={"CPU": 4.0}, claimed={}, total={"CPU": 4.0})
    assert not never.granted and "the cluster has 0 in all" in never.detail
    assert concurrency_limit({}) is None and concurrency_limit({"SAGE_MAX_CONCURRENT_JOBS": "3"}) == 3
    with pytest.raises(ValueError, match="positive whole number"):
        concurrency_limit({"SAGE_MAX_CONCURRENT_JOBS": "0"})


def test_queue_decisions_count_what_the_autoscaler_can_add():
    """A node group at 0 nodes (cluster.yaml's GPU groups start that way) is started by the
    autoscaler only when something asks for it: a job that fits once it is there starts."""
    from sage_ray.registry.queue import decide

    need = {"CPU": 1.0, "GPU": 1.0, "sage_train": 1.0}
    head = {"CPU": 8.0, "sage_studio": 1.0}
    ceiling = {"CPU": 8.0 + 2 * 8, "GPU": 2.0, "sage_train": 2.0, "sage_studio": 1.0}
    without = decide(need, ahead=0, running=0, limit=None, available=head, claimed={}, total=head)
    assert not without.granted and "the cluster has 0 in all" in without.detail
    scaled = decide(need, ahead=0, running=0, limit=None, available=head, claimed={}, total=head, ceiling=ceiling)
    assert scaled.granted and scaled.detail == "starting: the autoscaler adds nodes for 1 GPU, 1 sage_train"
    # a second such job while the first one's node is still coming: the group has room for one more
    second = decide(need, ahead=0, running=1, limit=None, available=head, claimed=need, total=head, ceiling=ceiling)
    assert second.granted
    third = decide(need, ahead=0, running=2, limit=None, available=head, total=head, ceiling=ceiling,
                   claimed={"CPU": 2.0, "GPU": 2.0, "sage_train": 2.0})
    assert not third.granted and third.detail == "waiting for resources: needs 1 GPU, 0 free; needs 1 sage_train, 0 free"
    too_big = decide({"GPU": 4.0}, ahead=0, running=0, limit=None, available=head, claimed={}, total=head,
                     ceiling=ceiling)
    assert not too_big.granted and "has 0 in all, and its autoscaler can reach 2" in too_big.detail
    limited = decide(need, ahead=0, running=1, limit=1, available=head, claimed={}, total=head, ceiling=ceiling)
    assert not limited.granted and "1 of 1 concurrent jobs" in limited.detail  # the limit still holds


def test_slot_queue_grants_in_order_and_skips_dead_waiters(store: RegistryStore, monkeypatch):
    from sage_ray.registry import queue

    state = {"available": {"CPU": 2.0}, "live": {"d1", "d2", "d3"}}
    slots = queue.SlotQueue(lambda: (state["available"], {"CPU": 2.0}, state["live"]))
    for name in ("a", "b", "c"):
        store.create_job(name, config={"cpus_per_worker": 2})
    need = {"CPU": 2.0}
    assert not slots.acquire(store, "b", need, None, "d2")["granted"]  # a is older and may be starting
    assert store.get_job("b")["status_detail"] == "waiting for resources: 1 job(s) ahead in the queue"
    assert slots.acquire(store, "a", need, None, "d1")["granted"]
    assert store.get_job("a")["status"] == "preparing"
    # a's workers are not placed yet: Ray still shows the CPUs free, the queue counts them taken
    answer = slots.acquire(store, "b", need, None, "d2")
    assert not answer["granted"] and answer["detail"] == "waiting for resources: needs 2 CPU, 0 free"
    store.report_progress("a", {"step": 1})  # training: Ray's figures include a's workers now
    state["available"] = {"CPU": 0.0}
    assert not slots.acquire(store, "b", need, None, "d2")["granted"]
    state["live"] = {"d2", "d3"}  # a's driver died without a word: its CPUs are Ray's to report
    state["available"] = {"CPU": 2.0}
    assert slots.acquire(store, "b", need, 1, "d2")["granted"]  # a no longer counts toward the limit
    # a waiter that stopped asking long ago no longer holds up the ones behind it
    store.create_job("d", config={})
    monkeypatch.setattr(queue, "STARTUP_GRACE_S", 0.0)
    store.update_job("b", status="completed")
    slots.last_asked["c"] = time.time() - 60
    assert slots.acquire(store, "d", {"CPU": 1.0}, None, "d4")["granted"]
    store.update_job("c", status="cancelled")
    assert slots.acquire(store, "c", need, None, "d3") == {"granted": False, "status": "cancelled",
                                                          "detail": None}


def test_cancelled_tasks_are_not_registered_and_delete_removes_a_task(tmp_path: Path):
    import json

    from sage_ray.registry import RegistryActor

    home = tmp_path / "home"
    for task in ("done", "stopped"):
        lora = home / "studio_finetune" / task / "lora"
        lora.mkdir(parents=True)
        (lora / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": "base"}))
        (lora / "adapter_model.safetensors").write_bytes(b"\0" * 8)
        (lora.parent / "finetune_meta.json").write_text(json.dumps({"task_id": task, "base_model": "base"}))
    store = RegistryStore(home / "registry.db")
    store.create_job("stopped")
    store.update_job("stopped", status="cancelled")  # a cancel that raced the job's last write
    store.create_job("done")
    actor = RegistryActor(str(home))
    assert actor.get_task_model("done")["kind"] == "lora" and actor.get_task_model("stopped") is None

    with pytest.raises(InUseError, match="cancel it first"):
        actor.delete_task("done")  # still queued as far as the store knows
    store.update_job("done", status="completed")
    assert actor.delete_task("done") is True
    assert not (home / "studio_finetune" / "done").exists()
    assert store.get_job("done") is None and actor.get_task_model("done") is None


def test_log_chunks_hold_back_a_line_still_being_written(tmp_path: Path):
    from sage_ray.registry.taskfiles import read_chunk, read_tail

    log = tmp_path / "train.log"
    assert read_chunk(log, 0) == ("", 0) and read_tail(log, 5) == ""
    log.write_text("one\ntwo\nthr")
    text, offset = read_chunk(log, 0)
    assert text == "one\ntwo\n" and offset == 8
    with open(log, "a") as f:
        f.write("ee\n")
    assert read_chunk(log, offset) == ("three\n", 14)
    assert read_tail(log, 2) == "two\nthree\n" and read_tail(log, None) == "one\ntwo\nthree\n"


def test_a_stopped_run_cannot_touch_its_resumed_successor(store: RegistryStore):
    store.create_job("t", status="training", ray_job_id="t")
    assert store.update_job("t", owner="t", status="cancelled")["status"] == "cancelled"
    store.update_job("t", status="queued", ray_job_id="t-resume1")  # the resume takes the record over
    late = store.update_job("t", owner="t", status="cancelled", only_if=("queued", "training"))
    assert late is None and store.get_job("t")["status"] == "queued"
    assert store.update_job("t", owner="t-resume1", status="training")["status"] == "training"
    assert store.update_job("t", status="failed", error="x")["status"] == "failed"  # no owner: no guard


@pytest.mark.parametrize("name", ["demo", "tiny", "tiny-qwen2", "SmolLM2-135M-Instruct"])
def test_a_task_cannot_take_a_built_in_models_name(store: RegistryStore, name: str):
    with pytest.raises(AlreadyExistsError, match="built-in model"):
        store.create_job(name, config={})
    assert store.get_job(name) is None


def test_a_task_cannot_take_another_models_registry_name(store: RegistryStore, tmp_path: Path):
    store.upsert_artifact({"name": "my-base", "kind": "base", "path": str(tmp_path / "my-base")})
    store.upsert_artifact({"name": "old-task", "kind": "merged", "path": str(tmp_path / "old"), "task_id": "old-task"})
    with pytest.raises(AlreadyExistsError, match="registry name of a base model"):
        store.create_job("my-base", config={})
    assert store.create_job("old-task", config={})["task_id"] == "old-task"  # its own models: a re-run
    assert store.get_artifact("my-base")["kind"] == "base"
