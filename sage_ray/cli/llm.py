"""`sage llm ...`: the models the registry knows."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from sage_ray.cli.common import local_registry

app = typer.Typer(help="Models: base models, LoRA adapters and merged fine-tunes.", no_args_is_help=True)
model_app = typer.Typer(help="Inspect registered models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def human_size(size: int | None) -> str:
    if not size:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"


@model_app.command("show")
def show() -> None:
    """All models, base and fine-tuned, with type, base model, path, size and which is active."""
    registry = local_registry()
    active = registry.get_active_model()
    artifacts = registry.list_artifacts()
    if not artifacts:
        Console().print("no models registered yet: `sage finetune quickstart chat` makes one")
        return
    table = Table("name", "type", "base model", "path", "size", "created", "active")
    for item in artifacts:
        is_active = active in (item["name"], item["path"])
        table.add_row(item["name"], item["kind"], item.get("base_model") or "-", item["path"],
                      human_size(item.get("size_bytes")), (item.get("created_at") or "")[:19],
                      "yes" if is_active else "")
    Console(width=240).print(table)
