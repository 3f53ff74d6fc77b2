"""The `sage` (alias `sage-ray`) command line."""

from __future__ import annotations

import typer

from sage_ray.cli import chat, finetune, llm, promote, studio

app = typer.Typer(help="sage-ray: fine-tune LLMs with LoRA on Ray and chat with the result.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(finetune.app, name="finetune")
app.add_typer(studio.app, name="studio")
app.add_typer(llm.app, name="llm")
app.command("chat")(chat.chat)
# registered here so that `sage finetune chat ID` lives with the other chat code (cli/chat.py)
finetune.app.command("chat")(chat.finetune_chat)
finetune.app.command("compare")(promote.compare)
studio.app.command("switch")(promote.switch)
studio.app.command("rollback")(promote.rollback)


def main() -> None:
    app()
