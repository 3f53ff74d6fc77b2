"""Fine-tunes as Ray jobs on the session's cluster: validation, the queue, a registry killed
mid-job, cancel, resume from a checkpoint, logs and delete (sage_ray.jobs)."""

from __future__ import annotations

import json
import time

import psutil
import pytest
import ray

from sage_ray import TrainConfig, jobs, ray_jobs
from sage_ray.config import ConfigError
from sage_ray.data import DatasetError
from sage_ray.registry import RegistryActor, get_registry

pytestmark = pytest.mark.ray
STEPS = 60  # the first queued job: long enough (on 2 busy cores) for the second's driver to start


def tiny(name: str, model_dir, data, **fields) -> TrainConfig:
    values = {"batch_size": 2, "max_length": 128, "cpus_per_worker": 1, "lora": {"r": 4}, **fields}
    return TrainConfig(name=name, model=str(model_dir), data=str(data), **values)


def watch(task_ids: list[str], until, poll_s: float = 0.25, timeout_s: float = 300) -> dict[str, list[dict]]:
    """Records of the jobs every `poll_s` until `until(latest records)` is true."""
    seen: dict[str, list[dict]] = {task_id: [] for task_id in task_ids}
    deadline = time.monotonic() + timeout_s
    while True:
        latest = {task_id: jobs.get(task_id) for task_id in task_ids}
        for task_id, job in latest.items():
            seen[task_id].append(job)
            assert job["status"] != "failed", job["error"]
        if until(latest):
            return seen
        assert time.monotonic() < deadline, {t: (j["status"], j["status_detail"]) for t, j in latest.items()}
        time.sleep(poll_s)


def snapshot_step(ray_cluster, task_id: str) -> int | None:
    """The step of the checkpoint Ray Train has committed for the task, if any yet."""
    path = ray_cluster.sage_home / "studio_finetune" / task_id / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(path.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, ValueError):
        return None
    return latest["metrics"]["step"] if latest else None


def cluster_commands(ray_cluster) -> dict[int, str]:
    """pid -> command line of the session cluster's raylet (named by its temp dir) and descendants."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if "raylet" in " ".join(p.info["cmdline"] or ()) and ray_cluster.temp_dir in " ".join(p.info["cmdline"])]
    commands = {}
    for proc in [proc for root in roots for proc in (root, *root.children(recursive=True))]:
        try:
            commands[proc.pid] = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            pass
    return commands


def training_pids(ray_cluster) -> set[int]:
    return {pid for pid, c in cluster_commands(ray_cluster).items() if "RayTrainWorker" in c or "TrainController" in c}


def test_submit_refuses_bad_input_before_anything_runs(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "bye", "output": 3}\n')
    with pytest.raises(DatasetError, match="broken.jsonl, line 2"):
        jobs.submit(tiny("bad-data-job", tiny_model_dir, data))
    with pytest.raises(jobs.JobNotFoundError):  # nothing was recorded or submitted
        jobs.get("bad-data-job")
    with pytest.raises(ConfigError, match="no dataset"):
        jobs.submit(TrainConfig(name="no-data", model=str(tiny_model_dir)))
    with pytest.raises(ConfigError, match="task id"):
        jobs.submit(tiny("../escape", tiny_model_dir, data))
    monkeypatch.setenv("SAGE_MAX_CONCURRENT_JOBS", "zero")
    with pytest.raises(ConfigError, match="SAGE_MAX_CONCURRENT_JOBS"):
        jobs.submit(tiny("bad-limit", tiny_model_dir, data))
    for call in (jobs.get, jobs.cancel, jobs.delete, jobs.resume, jobs.logs):
        with pytest.raises(jobs.JobNotFoundError, match="no-such-job"):
            call("no-such-job")
    assert jobs.dashboard_url() == ray_cluster.dashboard_url


def test_queue_limit_registry_kill_and_logs(ray_cluster, tiny_model_dir, chat_data, monkeypatch):
    """Two jobs, room for one: the second waits (queued, saying why), then runs and completes.
    Meanwhile the registry actor is killed: a new one has every record and progress still arrives."""
    monkeypatch.setenv("SAGE_MAX_CONCURRENT_JOBS", "1")  # forwarded to the jobs by submit
    first = jobs.submit(tiny("queue-first", tiny_model_dir, chat_data, max_steps=STEPS, save_steps=100))
    second = jobs.submit(tiny("queue-second", tiny_model_dir, chat_data, max_steps=3))
    assert (first, second) == ("queue-first", "queue-second")

    def second_waits_while_first_trains(latest):
        assert latest[first]["status"] != "completed", "the first job ended before the second one was queued"
        return (latest[first]["step"] or 0) >= 3 and (latest[second]["status_detail"] or "").startswith(
            "waiting for resources: 1 of 1 concurrent jobs running")

    seen = watch([first, second], second_waits_while_first_trains)
    assert seen[second][-1]["status"] == "queued" and seen[first][-1]["status"] == "training"

    killed_at = seen[first][-1]["step"]
    ray.kill(get_registry(ray_cluster.sage_home), no_restart=True)
    later = watch([first, second], lambda jobs_: all(j["status"] == "completed" for j in jobs_.values()))
    for task_id in (first, second):
        assert later[task_id][-1]["status"] == "completed", later[task_id][-1]
    after_kill = [job["step"] for job in later[first] if job["step"]]
    assert max(after_kill) == STEPS and max(after_kill) > killed_at  # progress kept arriving

    history = [(j["step"], j["progress"], len(j["loss_history"])) for j in seen[first] + later[first]
               if j["status"] == "training"]
    assert len({step for step, _p, _n in history}) >= 3 and history == sorted(history), history
    done = {task_id: jobs.get(task_id) for task_id in (first, second)}
    assert done[second]["started_at"] >= done[first]["finished_at"]  # it started once the first ended
    assert [step for step, _loss in done[second]["loss_history"]] == [1, 2, 3]

    lines = list(jobs.follow_logs(first))  # the job has ended: prints everything, then stops
    assert any(f"step {STEPS}/{STEPS}" in line for line in lines) and any("completed" in line for line in lines)
    assert len(jobs.logs(first, tail=2).splitlines()) == 2
    queued_log = jobs.logs(second)
    assert "queued: waiting for resources" in queued_log

    # a cluster restart, as far as the registry is concerned: a fresh actor on the same store
    fresh = RegistryActor(str(ray_cluster.sage_home))
    assert {first, second} <= {job["task_id"] for job in fresh.list_jobs("completed")}
    assert fresh.get_task_model(first)["path"].endswith(f"{first}/lora")

    with pytest.raises(jobs.JobStateError, match="completed"):
        jobs.resume(first)
    jobs.delete(first)
    assert not (ray_cluster.sage_home / "studio_finetune" / first).exists()
    with pytest.raises(jobs.JobNotFoundError):
        jobs.get(first)
    assert fresh.get_task_model(first) is None


def test_cancel_then_resume_from_the_last_checkpoint(ray_cluster, tiny_model_dir, chat_data):
    earlier = training_pids(ray_cluster)  # other tests' runs are not this job's to clean up
    task_id = jobs.submit(tiny("cancel-resume", tiny_model_dir, chat_data, max_steps=30, save_steps=4))
    watch([task_id], lambda j: (snapshot_step(ray_cluster, task_id) or 0) >= 4 and j[task_id]["step"] >= 6)
    with pytest.raises(jobs.JobStateError, match="cancel it first"):
        jobs.delete(task_id)
    ray_job = ray_jobs.client().get_job_info(jobs.get(task_id)["ray_job_id"])

    started = time.monotonic()
    cancelled = jobs.cancel(task_id)
    assert time.monotonic() - started < 10
    assert cancelled["status"] == "cancelled"
    assert ray_jobs.client().get_job_info(task_id).status.value == "STOPPED"
    assert not ray_jobs.live_actors(ray_job.job_id)
    while True:  # the job's processes exit as their actors die: all gone within the 10 s of a cancel
        commands = cluster_commands(ray_cluster)
        assert any("raylet" in command for command in commands.values())  # the check looks at the right tree
        leftovers = [c for pid, c in commands.items() if task_id in c or pid in training_pids(ray_cluster) - earlier]
        if not leftovers or time.monotonic() - started > 10:
            break
        time.sleep(0.2)
    assert not leftovers, leftovers
    assert not ray.get(get_registry(ray_cluster.sage_home).list_artifacts.remote(task_id=task_id))

    checkpoint = snapshot_step(ray_cluster, task_id)
    assert checkpoint and checkpoint % 4 == 0
    jobs.resume(task_id)
    resumed = jobs.get(task_id)
    assert resumed["status"] in ("queued", "preparing") and resumed["ray_job_id"] == f"{task_id}-resume1"
    assert resumed["step"] == checkpoint  # progress set back to the checkpoint, not to 0
    assert [step for step, _loss in resumed["loss_history"]] == list(range(1, checkpoint + 1))

    done = jobs.wait(task_id, timeout_s=300)
    assert done["status"] == "completed", done
    assert [step for step, _loss in done["loss_history"]] == list(range(1, 31))
    log = jobs.logs(task_id).splitlines()
    resumed_at = max(i for i, line in enumerate(log) if "resuming from" in line)
    first_event = next(json.loads(line.split(" EVENT ", 1)[1]) for line in log[resumed_at:] if " EVENT " in line)
    assert first_event["step"] == checkpoint + 1  # from the checkpoint, not from step 0
