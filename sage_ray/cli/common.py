"""What every `sage` command shares: the console, error exits, following a training run."""

from __future__ import annotations

import json
import threading
import time
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from sage_ray.config import TrainConfig
from sage_ray.errors import SageError
from sage_ray.registry.status import JobStatus

console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


def _follow_log(path, progress: Progress, bar, stop: threading.Event) -> None:
    """Tail train.log: progress events move the bar, other lines are printed as they are."""
    offset = 0
    while not stop.is_set():
        if path.exists():
            with open(path, encoding="utf-8") as f:
                f.seek(offset)
                for line in f:
                    _, _, text = line.rstrip("\n").partition(" ")
                    _, _, text = text.partition(" ")  # drop the date and time stamp
                    if text.startswith("EVENT "):
                        event = json.loads(text[6:])
                        if event.get("event") == "eval":
                            continue  # its readable line ("eval at step N: ...") is printed
                        progress.update(bar, visible=True, total=event["total_steps"], completed=event["step"],
                                        loss=f"{event['loss']:.4f}", rate=event["tokens_per_s"] or "-")
                    elif not text.startswith("step "):
                        progress.console.print(f"[dim]{text}[/]")
                offset = f.tell()
        stop.wait(0.3)


def run_with_progress(cfg: TrainConfig, address: str | None):
    """Run `finetune` here, with a progress bar fed from the task's log; user errors exit 1."""
    from sage_ray.paths import TaskPaths
    from sage_ray.train.callbacks import ECHO
    from sage_ray.train.trainer import finetune, new_task_id

    cfg = cfg.model_copy(update={"name": cfg.name or new_task_id(cfg.task)})
    paths = TaskPaths(cfg.name)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("step {task.completed}/{task.total}"), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn())
    stop = threading.Event()
    error: Exception | None = None
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(cfg.name, total=None, loss="-", rate="-", visible=False)
        follower = threading.Thread(target=_follow_log, args=(paths.train_log, progress, bar, stop), daemon=True)
        follower.start()
        ECHO["stdout"] = False  # the follower prints train.log: an echo too would show each line twice
        try:
            return finetune(cfg, address=address, log_to_driver=False)
        except SageError as err:
            error = err
        finally:
            ECHO["stdout"] = True
            time.sleep(0.4)  # let the follower print the last lines
            stop.set()
            follower.join()
    log = f"\nlog: {paths.train_log}" if paths.train_log.exists() else ""
    fail(f"{error}{log}")


def jobs_call(function, *args, **kwargs):
    """Run a jobs / cluster call; the user's mistakes (bad config or dataset, unknown task, wrong
    state, no cluster) exit 1 with their message instead of a traceback."""
    try:
        return function(*args, **kwargs)
    except SageError as err:
        fail(str(err))


def _eta(seconds) -> str:
    from sage_ray.train.callbacks import format_eta

    return format_eta(seconds) if seconds is not None else "-"


def _print_log_lines(task_id: str, progress: Progress, stop: threading.Event) -> None:
    """Print the job's log as it grows, except progress lines (the bar shows those)."""
    from sage_ray import jobs

    for line in jobs.follow_logs(task_id, poll_s=0.3):
        _, _, text = line.partition(" ")
        _, _, text = text.partition(" ")  # drop the date and time stamp
        if not text.startswith(("EVENT ", "step ")):
            progress.console.print(f"[dim]{text}[/]")
        if stop.is_set():
            return


def follow_job(task_id: str) -> dict:
    """Follow a submitted job with a progress bar (step, loss, tokens/s, ETA) and its log lines;
    print where the model is when it completes, exit 1 when it fails or is cancelled."""
    from sage_ray import jobs

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("step {task.completed}/{task.total}"), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]} tok/s"), TextColumn("ETA {task.fields[eta]}"),
               TextColumn("{task.fields[state]}"))
    stop = threading.Event()
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(task_id, total=None, loss="-", rate="-", eta="-", state=JobStatus.QUEUED)

        def show(job: dict) -> None:
            loss = f"{job['loss']:.4f}" if job.get("loss") is not None else "-"
            progress.update(bar, total=job.get("total_steps"), completed=job.get("step") or 0, loss=loss,
                            rate=job.get("tokens_per_s") or "-", eta=_eta(job.get("eta_s")), state=status_text(job))

        printer = threading.Thread(target=_print_log_lines, args=(task_id, progress, stop), daemon=True)
        printer.start()
        try:
            job = jobs_call(jobs.wait, task_id, on_progress=show)
        finally:
            stop.set()
            printer.join(timeout=3)
    if job["status"] != JobStatus.COMPLETED:
        reason = job.get("error") or job.get("status_detail") or job["status"]
        fail(f"task {task_id} {job['status']}: {reason}\nlog: sage finetune logs {task_id}")
    model = jobs_call(jobs.model_of, task_id)
    where = f"{model['kind']} model at {model['path']}" if model else "no model registered"
    console.print(f"[green]done[/] task [bold]{task_id}[/]: {where}")
    return job


def local_registry(address: str | None = None):
    """The registry for reading: the cluster's actor when one runs, else registry.db opened
    read-only (registry.client.reader). Never writes: the actor is the store's one writer."""
    from sage_ray.registry.client import reader

    return reader(address)


def status_text(job: dict) -> str:
    detail = job.get("status_detail")
    return f"{job['status']} ({detail})" if detail else job["status"]


def follow_log(registry, task_id: str, text: str, offset: int, follow: bool, poll_s: float = 0.5) -> None:
    """Print the log text read so far; with `follow`, what is appended until the job has ended."""
    import sys

    from sage_ray.registry.status import TERMINAL

    while True:
        sys.stdout.write(text)
        sys.stdout.flush()
        job = registry.get_job(task_id) if follow else None
        finished = not follow or job is None or job["status"] in TERMINAL
        text, offset = registry.read_log(task_id, offset)
        if not text:
            if finished:
                return
            time.sleep(poll_s)
