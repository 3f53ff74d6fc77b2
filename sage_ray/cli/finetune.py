"""`sage finetune ...`: start, quickstart and merge fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from rich.console import Console

from sage_ray.cli.common import (console, fail, follow_job, follow_log, jobs_call, local_registry,
                                 run_with_progress, status_text)
from sage_ray.config import TrainConfig, load_train_config, parse_train_config

app = typer.Typer(help="Fine-tune models with LoRA / QLoRA on Ray Train.", no_args_is_help=True)

QUICKSTART_DIR = Path(__file__).resolve().parent.parent / "quickstart"


def quickstart_manifest() -> dict:
    return json.loads((QUICKSTART_DIR / "manifest.json").read_text(encoding="utf-8"))


def build_config(base: TrainConfig | None, **options) -> TrainConfig:
    """The config file's values (if any) with every option the user gave on top."""
    values = base.model_dump(exclude_unset=True) if base else {}
    lora = dict(values.pop("lora", {}))
    for key in ("r", "alpha"):
        value = options.pop(f"lora_{key}")
        if value is not None:
            lora[key] = value
    values.update({key: value for key, value in options.items() if value is not None})
    return parse_train_config({**values, "lora": lora}, source="command line")


@app.command()
def start(
    task: Optional[str] = typer.Option(None, help="Kind of task: code, qa, chat, instruction or custom."),
    model: Optional[str] = typer.Option(None, help="Base model: local folder, hub id, 'demo' or 'tiny'. (default: demo)"),
    data: Optional[Path] = typer.Option(None, help="Dataset file, JSON array or JSONL."),
    val_data: Optional[Path] = typer.Option(None, help="Validation file (sft): eval loss and token accuracy on it."),
    validation_split: Optional[float] = typer.Option(None, help="Fraction of --data held out for evaluation (sft). "
                                                                "(default: 0.1 of datasets of 50+ records, else 0)"),
    eval_steps: Optional[int] = typer.Option(None, help="Evaluate every N steps and at the end (default: ~10 per run)."),
    keep: Optional[str] = typer.Option(None, help="The adapter exported: 'last' (the last step's) or 'best' (the "
                                                  "lowest eval loss; needs a validation set). (default: last)"),
    method: Optional[str] = typer.Option(None, help="sft (supervised), dpo or orpo (chosen/rejected pairs), kto "
                                                   "(labelled replies). (default: sft)"),
    beta: Optional[float] = typer.Option(None, help="dpo/orpo/kto: preference strength (default: 0.1)."),
    preset: Optional[str] = typer.Option(None, help="auto, cpu, minimal, rtx_3060, rtx_4090, a100 or h100. (default: auto)"),
    epochs: Optional[float] = typer.Option(None, help="Training epochs. (default: 1)"),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Per-worker batch size (default: the preset's)."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps (default: the preset's)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate. (default: 2e-4)"),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank (default: the preset's)."),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha (default: the preset's)."),
    max_length: Optional[int] = typer.Option(None, help="Max tokens per example (default: the preset's)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (data parallel). (default: 1)"),
    name: Optional[str] = typer.Option(None, help="Task id (default: generated)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="Merge the adapter into a full model after training."),
    save_steps: Optional[int] = typer.Option(None, help="Checkpoint every N steps, for resume. (default: 50)"),
    cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per worker (default: 1 with GPUs, else all)."),
    config: Optional[Path] = typer.Option(None, help="Start from a fine-tune YAML; options given here override it."),
    address: Optional[str] = typer.Option(None, help="Ray cluster (GCS) address (default: RAY_ADDRESS, else the "
                                                     "running local cluster, else a new one on 127.0.0.1)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job with a progress bar; exit 1 unless it completes."),
) -> None:
    """Submit a fine-tune to the Ray cluster as a Ray job and print its task id."""
    from sage_ray import jobs
    from sage_ray.cluster import ensure_cluster

    base = load_train_config(config) if config else None
    cfg = jobs_call(build_config, base, task=task, model=model, data=str(data) if data else None,
                    val_data=str(val_data) if val_data else None, validation_split=validation_split,
                    eval_steps=eval_steps, keep=keep, method=method, beta=beta, preset=preset, epochs=epochs,
                    max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, lora_r=lora_r,
                    lora_alpha=lora_alpha, max_length=max_length, num_workers=workers, name=name, merge=merge,
                    save_steps=save_steps, cpus_per_worker=cpus_per_worker)
    cfg = jobs_call(jobs.prepare, cfg)  # a bad config or dataset fails before any cluster starts
    cluster = jobs_call(ensure_cluster, address)
    task_id = jobs_call(jobs.submit, cfg)
    console.print(f"submitted task [bold]{task_id}[/] to {cluster.dashboard_url}")
    print(task_id)
    if wait:
        follow_job(task_id)
    else:
        console.print(f"follow it: sage finetune logs {task_id} --follow   |   sage finetune status {task_id}")


@app.command()
def quickstart(
    task: str = typer.Argument(..., help="code, qa, chat or instruction."),
    model: str = typer.Option("demo", help="Base model (default: the demo SmolLM2-135M-Instruct)."),
    preset: str = typer.Option("auto", help="Memory preset."),
    # Two epochs at a LoRA learning rate of 1e-3: on ~50 short records that is enough for the
    # fine-tune's style (short replies that stop) to show in the sample reply.
    epochs: float = typer.Option(2.0, help="Training epochs."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps (for a shorter run)."),
    name: Optional[str] = typer.Option(None, help="Task id (default: generated)."),
    address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS, else a local cluster)."),
) -> None:
    """A short real fine-tune on a dataset shipped with sage-ray, then a reply from the result."""
    manifest = quickstart_manifest()
    if task not in manifest:
        fail(f"unknown quickstart task {task!r}: choose one of {', '.join(manifest)}")
    entry = manifest[task]
    console.print(f"[bold]quickstart {task}[/]: {entry['description']}")
    cfg = TrainConfig(task=task, model=model, data=str(QUICKSTART_DIR / entry["file"]), preset=preset,
                      epochs=epochs, lr=lr, max_steps=max_steps, name=name, merge=True)
    from sage_ray.cluster import find_cluster

    # In this process (the sample reply follows at once), on the running cluster when there is one
    # (so the Studio lists it), else on a local Ray that ends with the command.
    jobs_call(find_cluster, address)
    result = run_with_progress(cfg, address)
    console.print(f"[green]done[/] task [bold]{result.task_id}[/]: merged model at {result.model_path}")
    show_held_out(result)
    show_sample_reply(result.model_path, entry["sample_prompt"])


def show_held_out(result) -> None:
    """The base and the fine-tune on the records training held out: each one's loss on the
    reference replies and how often its greedy answer holds the reference."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from sage_ray import comparison
    from sage_ray.paths import sage_home
    from sage_ray.serve.engines.base import ModelSpec

    meta = result.meta
    tuned = ModelSpec(result.task_id, str(result.model_path), "merged" if meta["merged_path"] else "lora",
                      base_path=meta["base_model_path"])
    base = ModelSpec(Path(meta["base_model"]).name, meta["base_model_path"], "base")
    source = {"task": result.task_id, "home": str(sage_home())}
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                      transient=True) as progress:
            bar = progress.add_task("held-out records: loading the models", total=None)
            outcome = comparison.compare(tuned, base, source, limit=8, on_progress=lambda p: progress.update(
                bar, completed=p["done"], total=p["total"], description=f"held-out records: {p['model']}"))
    except comparison.CompareError as err:
        console.print(f"[dim]no held-out figures: {err}[/]")
        return
    summary = outcome["summary"]
    table = Table(title=f"held-out records ({summary['examples']}): base vs fine-tune", title_justify="left")
    for column in ("model", "loss", "exact match", "contains reference"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, key in ((f"base ({base.name})", "against"), (f"fine-tune ({result.task_id})", "candidate")):
        figures = summary[key]
        loss = "-" if figures["mean_loss"] is None else f"{figures['mean_loss']:.3f}"
        table.add_row(label, loss, f"{figures['exact_match']:.0%}",
                      f"{figures['contains_reference']:.0%}")
    console.print(table)
    console.print(f"[dim]each answer side by side, with the Studio running: sage finetune compare "
                  f"{result.task_id} --against {base.path}[/]")


def show_sample_reply(model_path: Path, prompt: str) -> None:
    from transformers import TextStreamer

    from sage_ray.inference import generate_reply, load_chat_model

    model, tokenizer = load_chat_model(model_path)
    console.print(f"\n[bold cyan]you[/]: {prompt}\n[bold magenta]fine-tuned model[/]: ", end="")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    # Greedy decoding makes a 135M model loop; a mild repetition penalty keeps the sample readable.
    generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=200,
                   streamer=streamer, repetition_penalty=1.15)


@app.command()
def merge(task_id: str = typer.Argument(..., help="Task id of a completed fine-tune."),
          address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else "
                                                           "the local one, started if none runs).")) -> None:
    """Merge a task's LoRA adapter into its base model (writes <task>/merged_model/ and registers it)."""
    from sage_ray import jobs
    from sage_ray.cluster import ensure_cluster

    jobs_call(ensure_cluster, address)
    with console.status(f"merging the adapter of {task_id} into its base model"):
        model = jobs_call(jobs.merge, task_id)
    console.print(f"[green]merged[/]: {model['name']} at {model['path']}")


@app.command()
def cancel(task_id: str = typer.Argument(..., help="Task id."),
           address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local).")) -> None:
    """Stop a queued or running job; it can be resumed from its last checkpoint."""
    from sage_ray import jobs

    _join(address)
    job = jobs_call(jobs.cancel, task_id)
    console.print(f"task [bold]{task_id}[/]: {status_text(job)} (sage finetune resume {task_id} continues it)")


@app.command()
def resume(task_id: str = typer.Argument(..., help="Task id of a failed or cancelled job."),
           address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)."),
           wait: bool = typer.Option(False, "--wait", help="Follow the job; exit 1 unless it completes.")) -> None:
    """Continue a failed or cancelled job from its last checkpoint."""
    from sage_ray import jobs

    _join(address)
    jobs_call(jobs.resume, task_id)
    console.print(f"resumed task [bold]{task_id}[/]: {status_text(jobs_call(jobs.get, task_id))}")
    if wait:
        follow_job(task_id)


@app.command()
def delete(task_id: str = typer.Argument(..., help="Task id of a finished job."),
           address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Remove a finished job: its task folder (models, checkpoints, log) and its records."""
    from sage_ray import jobs

    _join(address)
    if not yes and not typer.confirm(f"delete task {task_id} and all its files?"):
        raise typer.Exit(1)
    jobs_call(jobs.delete, task_id)
    console.print(f"deleted task [bold]{task_id}[/]")


def _join(address: str | None) -> None:
    """Join the cluster the job runs on; cancel/resume/delete need its Ray Jobs and registry."""
    from sage_ray.cluster import find_cluster

    if jobs_call(find_cluster, address) is None:
        fail("no Ray cluster is running here: pass --address (or set RAY_ADDRESS) for the job's cluster")


@app.command("list")
def list_tasks() -> None:
    """Every fine-tune job in the registry: id, status, progress, loss, model."""
    jobs = local_registry().list_jobs()
    if not jobs:
        console.print("no fine-tune jobs yet: `sage finetune quickstart chat` runs one")
        return
    Console().print(jobs_table(jobs))


def jobs_table(jobs: list[dict]):
    """The jobs as a table whose task ids are never cut (they are copied into other commands):
    on a narrow terminal the other columns wrap instead."""
    from rich.table import Table

    table = Table()
    table.add_column("task id", no_wrap=True, min_width=max(len(job["task_id"]) for job in jobs))
    for header in ("status", "progress", "step", "loss", "model", "created"):
        table.add_column(header, overflow="fold")
    for job in jobs:
        config = job.get("config") or {}
        step = f"{job.get('step') or 0}/{job.get('total_steps') or '?'}"
        loss = f"{job['loss']:.4f}" if job.get("loss") is not None else "-"
        table.add_row(job["task_id"], status_text(job), f"{job.get('progress') or 0:.0f}%", step, loss,
                      str(config.get("model", "?")), (job.get("created_at") or "")[:19])
    return table


@app.command()
def status(task_id: str = typer.Argument(..., help="Task id.")) -> None:
    """One job's status, progress, loss, throughput and error, and its artifacts."""
    registry = local_registry()
    job = registry.get_job(task_id)
    if job is None:
        fail(f"no fine-tune job {task_id!r}: `sage finetune list` shows the ids")
    lines = [f"[bold]{task_id}[/]: {status_text(job)}",
             f"progress {job.get('progress') or 0:.0f}%  step {job.get('step') or 0}/{job.get('total_steps') or '?'}"
             f"  epoch {job.get('epoch') or 0:.2f}  loss {job.get('loss') if job.get('loss') is not None else '-'}"
             f"  tokens/s {job.get('tokens_per_s') or '-'}",
             f"log: {job.get('log_path')}"]
    evals = job.get("eval_history") or []
    if evals:
        step, loss, accuracy = evals[-1]
        best = min(evals, key=lambda point: point[1])
        lines.insert(2, f"eval loss {loss:.4f} at step {step}"
                        + (f"  token accuracy {accuracy:.4f}" if accuracy is not None else "")
                        + f"  (best {best[1]:.4f} at step {best[0]}; {len(evals)} evaluations)")
    if job.get("error"):
        lines.append(f"[red]error:[/] {job['error']}")
    for artifact in registry.list_artifacts(task_id=task_id):
        lines.append(f"{artifact['kind']}: {artifact['name']} at {artifact['path']}")
    Console().print("\n".join(lines))


@app.command()
def logs(task_id: str = typer.Argument(..., help="Task id."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the job ends.")) -> None:
    """Print a job's train.log (progress lines, dataset stats, errors), from any node of the cluster."""
    from sage_ray.paths import check_task_id

    try:
        check_task_id(task_id)
    except ValueError as err:
        fail(str(err))
    registry = local_registry()
    text, offset = registry.read_log(task_id, 0)
    if not text and registry.get_job(task_id) is None:
        fail(f"no log for {task_id!r}: `sage finetune list` shows the task ids")
    follow_log(registry, task_id, text, offset, follow)
