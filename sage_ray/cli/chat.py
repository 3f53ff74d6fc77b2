"""`sage chat` and `sage finetune chat ID`: a terminal chat that streams replies.

It reads one prompt per line from stdin, so it works typed and piped (`echo hi | sage chat`),
and keeps the conversation's history; `/reset` forgets it, `/exit` (or end of input) quits.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional
from urllib.parse import urlparse

import typer

from sage_ray import env
from sage_ray.cli.common import console, fail

BACKENDS = ("studio", "finetune", "openai", "vllm")
HELP = "type a message; /reset forgets the conversation, /exit quits"


def _client(url: str | None, api_key: str | None):
    from sage_ray.client import StudioClient

    return StudioClient(url, api_key=api_key, timeout=300)


def _studio_for(model: str, url: str | None, api_key: str | None):
    """A client of the running Studio; with none running, start one that serves `model`."""
    from sage_ray.cli.studio import launch

    client = _client(url, api_key)
    if client.health():
        return client  # chats name the model; the Studio's served model is left as it is
    console.print(f"no Studio answers at {client.url}: starting one with model {model}")
    port = urlparse(client.url).port or 8000
    started = launch(model=model, port=port, api_key=api_key)
    client.close()
    return _client(started, api_key)


def _read(interactive: bool) -> str | None:
    if interactive:
        console.print("[bold cyan]you>[/] ", end="")
    line = sys.stdin.readline()
    return None if line == "" else line.strip()


def converse(client, model: str | None, system: str | None, max_tokens: int, temperature: float | None) -> int:
    """The read-reply loop; returns how many replies failed."""
    from sage_ray.client import StudioError

    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    failures = 0
    if interactive:
        console.print(f"[dim]chatting with {model or 'the active model'} at {client.url} ({HELP})[/]")
    while (line := _read(interactive)) is not None:
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(start)
            console.print("[dim]conversation forgotten[/]")
            continue
        history.append({"role": "user", "content": line})
        pieces: list[str] = []
        try:
            for piece in client.chat(history, model=model, stream=True, max_tokens=max_tokens,
                                     temperature=temperature):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(pieces)})
        except StudioError as err:
            if pieces:
                sys.stdout.write("\n")
            history.pop()  # the unanswered prompt is not part of the conversation
            failures += 1
            console.print(f"[red]error:[/] {err}")
            if err.status is None:  # nothing answers: every later line would fail the same way
                break
    return failures


def run_chat(backend: str, finetune_model: str | None, model: str | None, base_url: str | None,
             api_key: str | None, system: str | None, max_tokens: int, temperature: float | None) -> None:
    if backend not in BACKENDS:
        fail(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "finetune":
        if not finetune_model:
            fail("--backend finetune needs the model: --finetune-model NAME (or SAGE_CHAT_FINETUNE_MODEL)")
        client = _studio_for(finetune_model, base_url, api_key)
        model = model or finetune_model
    elif backend in ("openai", "vllm"):
        if not base_url:
            fail(f"--backend {backend} needs the server: --base-url URL (e.g. http://127.0.0.1:8001/v1)")
        if backend == "openai" and not model:
            fail("--backend openai needs --model (the server's model name)")
        client = _client(base_url, api_key or env.value("OPENAI_API_KEY"))
    else:
        client = _client(base_url, api_key)
    with client:
        failures = converse(client, model, system, max_tokens, temperature)
    if failures:
        raise typer.Exit(1)


URL_HELP = "Server URL: the Studio (default: SAGE_STUDIO_URL, else http://127.0.0.1:8000) or an OpenAI-compatible /v1."
KEY_HELP = "API key sent as a bearer token (default: SAGE_STUDIO_API_KEY; OPENAI_API_KEY for --backend openai)."
# The options both chat commands take, declared once
BaseUrl = Annotated[Optional[str], typer.Option(envvar="SAGE_STUDIO_URL", help=URL_HELP)]
ApiKey = Annotated[Optional[str], typer.Option(help=KEY_HELP)]
System = Annotated[Optional[str], typer.Option(help="A system prompt that opens the conversation.")]
MaxTokens = Annotated[int, typer.Option(help="Longest reply, in tokens.")]
Temperature = Annotated[Optional[float], typer.Option(help="Sampling temperature (default: the server's).")]


def chat(
    backend: str = typer.Option("studio", envvar="SAGE_CHAT_BACKEND",
                                help="studio = the Studio's OpenAI API; finetune = the Studio with --finetune-model "
                                     "(started if none runs); openai / vllm = any OpenAI-compatible server."),
    finetune_model: Optional[str] = typer.Option(None, envvar="SAGE_CHAT_FINETUNE_MODEL",
                                                 help="Fine-tune to chat with (a registry name or task id)."),
    model: Optional[str] = typer.Option(None, help="Model name sent with each request (default: the active one)."),
    base_url: BaseUrl = None, api_key: ApiKey = None, system: System = None, max_tokens: MaxTokens = 512,
    temperature: Temperature = None,
) -> None:
    """Chat in the terminal with streaming replies; one prompt per line (piped input works).
    /reset forgets the conversation, /exit quits."""
    run_chat(backend, finetune_model, model, base_url, api_key, system, max_tokens, temperature)


def finetune_chat(
    task_id: str = typer.Argument(..., help="Task id (or registry name) of a completed fine-tune."),
    base_url: BaseUrl = None, api_key: ApiKey = None, system: System = None, max_tokens: MaxTokens = 512,
    temperature: Temperature = None,
) -> None:
    """Chat with a fine-tune's model through the Studio (started with that model if none runs)."""
    run_chat("finetune", task_id, None, base_url, api_key, system, max_tokens, temperature)
