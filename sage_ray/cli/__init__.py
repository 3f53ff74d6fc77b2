"""The `sage` (alias `sage-ray`) command line."""

from __future__ import annotations

import typer

from sage_ray.cli import finetune, llm

app = typer.Typer(help="sage-ray: fine-tune LLMs with LoRA on Ray and chat with the result.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(finetune.app, name="finetune")
app.add_typer(llm.app, name="llm")


def main() -> None:
    app()
