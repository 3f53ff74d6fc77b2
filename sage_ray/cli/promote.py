"""`sage finetune compare`, `sage studio switch [--if-better]`, `sage studio rollback`: the
running Studio compares, switches and rolls back (the model work runs on the cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sage_ray.cli.common import console, fail

URL_HELP = "The Studio's URL (default: SAGE_STUDIO_URL, else http://127.0.0.1:8000)."


def _request(url: str | None, method: str, path: str, **kwargs):
    from sage_ray.client import StudioClient, StudioError

    try:
        with StudioClient(url, timeout=1800) as client:
            return client.request(method, path, **kwargs)
    except StudioError as err:
        fail(str(err))


def _figures(summary: dict) -> str:
    def line(who: str, figures: dict) -> str:
        return (f"{who}: held-out loss {figures['mean_loss']}  exact match {figures['exact_match']:.0%}  "
                f"contains reference {figures['contains_reference']:.0%}")
    return f"{line('candidate', summary['candidate'])}\n{line('against  ', summary['against'])}"


def compare(task_id: str = typer.Argument(..., help="Task id of a completed fine-tune (the candidate)."),
            against: Optional[str] = typer.Option(None, help="Model to compare with (default: the served one)."),
            prompts: Optional[Path] = typer.Option(None, help="Dataset file of prompts with reference replies "
                                                              "(default: the task's held-out records)."),
            limit: int = typer.Option(32, help="At most this many examples."),
            as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
            url: Optional[str] = typer.Option(None, help=URL_HELP)) -> None:
    """The fine-tune and another model answer held-out prompts greedily, side by side, with each one's loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sage_ray.client import StudioClient, StudioError

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=as_json) as progress:
        bar = progress.add_task("comparing (loading the models)", total=None)

        def on_progress(event: dict) -> None:
            progress.update(bar, completed=event["done"], total=event["total"], description=f"answering: {event['model']}")

        try:
            with StudioClient(url, timeout=60) as client:
                result = client.jobs.compare(task_id, against=against, prompts=str(prompts.resolve()) if prompts else None,
                                             limit=limit, on_progress=on_progress)
        except StudioError as err:
            progress.stop()
            fail(str(err))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for number, row in enumerate(result["examples"], 1):
        prompt = row["prompt"][-1]["content"] if row["prompt"] else ""
        console.print(f"[bold]{number}. {prompt}[/]\n  reference: {row['reference']}\n"
                      f"  {result['candidate']}: {row['candidate']['output']}  (loss {row['candidate']['loss']})\n"
                      f"  {result['against']}: {row['against']['output']}  (loss {row['against']['loss']})")
    console.print(f"\n[bold]{result['candidate']}[/] vs [bold]{result['against']}[/] on "
                  f"{result['summary']['examples']} examples\n{_figures(result['summary'])}")


def switch(model: str = typer.Argument(..., help="A registry name, task id or path."),
           if_better: bool = typer.Option(False, "--if-better", help="Switch only if its held-out loss beats the "
                                                                     "served model's (exit 1 with the figures if not)."),
           prompts: Optional[Path] = typer.Option(None, help="--if-better: judge on this file instead."),
           canary: Optional[str] = typer.Option(None, help="A second model that answers --weight of the requests "
                                                           "naming no model (a canary)."),
           weight: Optional[float] = typer.Option(None, help="The canary's share of requests, e.g. 0.1."),
           url: Optional[str] = typer.Option(None, help=URL_HELP)) -> None:
    """Serve another model; every switch is recorded (`sage studio rollback` undoes it)."""
    body = {"model_path": model, "require_better": if_better, "prompts": str(prompts.resolve()) if prompts else None,
            "canary": canary, "weight": weight}
    answer = _request(url, "POST", "/api/finetune/switch-model", json=body)
    served = answer["model"]
    console.print(f"{served['name']}: {answer['message']}")
    if served.get("canary"):
        console.print(f"canary: {served['canary']['name']} answers {served['canary']['weight']:.0%} of the requests "
                      "that name no model")
    if answer.get("comparison"):
        console.print(_figures(answer["comparison"]))


def rollback(url: Optional[str] = typer.Option(None, help=URL_HELP)) -> None:
    """Return to the model served before the latest switch."""
    answer = _request(url, "POST", "/api/finetune/rollback")
    console.print(f"rolled back from {answer['rolled_back_from']} to {answer['model']['name']}: {answer['message']}")
