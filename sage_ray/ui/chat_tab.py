"""The Chat tab: streaming chat with the served model, and two models side by side.

The conversation lives in the Chatbot component (the browser), not in the model, so it
survives a model switch: the next reply simply comes from the new model.
"""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import gradio as gr

from sage_ray.ui import format as fmt

DEFAULT_MAX_TOKENS = 256
# Low by default: the small models this runs on by default wander at higher temperatures
DEFAULT_TEMPERATURE = 0.3
ERROR_MARK = "⚠ "
_DONE = object()


def content_text(content) -> str:
    """A Chatbot message's content as plain text.

    Gradio 6 hands history back as lists of typed parts ({"type": "text", "text": ...});
    files and components have no text for the model, so they are left out.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return ""


def to_messages(history: Iterable[dict]) -> list[dict]:
    """Chatbot history → OpenAI-style messages, dropping empty and error turns."""
    out = []
    for message in history or []:
        text = content_text(message.get("content"))
        if text and not text.startswith(ERROR_MARK):
            out.append({"role": message["role"], "content": text})
    return out


def _error_turn(message: str) -> dict:
    # The mark makes it a notice for the reader: to_messages keeps it out of the next request.
    return {"role": "assistant", "content": f"{ERROR_MARK}{message}"}


def stream_reply(service, history: list[dict], prompt: str, model: str | None,
                 max_tokens: int, temperature: float) -> Iterator[list[dict]]:
    """Yield the history with the user's turn, then the reply as it grows.

    Each yield is a new list: side-by-side mode hands them across threads.
    """
    messages = to_messages(history) + [{"role": "user", "content": prompt}]
    before = list(history or []) + [{"role": "user", "content": prompt}]
    yield before + [{"role": "assistant", "content": ""}]
    text = ""
    try:
        for piece in service.chat_stream(messages, model=model, max_tokens=int(max_tokens),
                                         temperature=float(temperature)):
            text += piece
            yield before + [{"role": "assistant", "content": text}]
    except Exception as exc:  # the reason (no model served, model failed) goes in the chat
        partial = [{"role": "assistant", "content": text}] if text else []
        yield before + partial + [_error_turn(fmt.error_text(exc))]
        return
    if not text:
        yield before + [_error_turn("The model returned an empty reply.")]


def merge_streams(makers: dict[str, Callable[[], Iterator]], stop: threading.Event
                  ) -> Iterator[tuple[str, object]]:
    """Run several blocking iterators at once; yield (key, item) as items arrive.

    Side-by-side answers stream together instead of one after the other; `stop` lets a
    cancelled request end the threads at their next item.
    """
    items: queue.Queue = queue.Queue()

    def pump(key, make):
        try:
            for item in make():
                if stop.is_set():
                    break
                items.put((key, item))
        finally:
            items.put((key, _DONE))

    for key, make in makers.items():
        threading.Thread(target=pump, args=(key, make), daemon=True, name=f"ui-chat-{key}").start()
    running = len(makers)
    while running:
        key, item = items.get()
        if item is _DONE:
            running -= 1
        else:
            yield key, item


def compare_replies(service, prompt: str, models: tuple[str | None, str | None],
                    histories: tuple[list, list], max_tokens: int, temperature: float
                    ) -> Iterator[tuple[list, list]]:
    """One prompt to two models; yields both histories each time either one grows."""
    if not (prompt or "").strip():
        yield histories
        return
    current = {"a": histories[0], "b": histories[1]}
    makers = {side: (lambda side=side, model=model: stream_reply(
        service, current[side], prompt, model, max_tokens, temperature))
        for side, model in zip(("a", "b"), models)}
    stop = threading.Event()
    try:
        for side, history in merge_streams(makers, stop):
            current[side] = history
            yield current["a"], current["b"]
    finally:
        stop.set()


def compare_defaults(models: list[dict], current: dict | None) -> tuple[list, str | None, str | None]:
    """Choices for both sides; A = the served model, B = the newest other model."""
    choices = fmt.model_choices(models, current)
    a = fmt.current_choice(models, current)
    finetuned = {m["name"] for m in models if m.get("kind", "base") != "base"}
    others = [v for _, v in choices if v != a]
    b = ([v for v in others if v in finetuned] or others or [a])[0]
    return choices, a, b


def _settings() -> tuple:
    with gr.Accordion("Generation settings", open=False, elem_id="chat-settings"):
        with gr.Row():
            max_tokens = gr.Slider(16, 2048, value=DEFAULT_MAX_TOKENS, step=16, label="Max new tokens",
                                   elem_id="max-tokens")
            temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                                    elem_id="temperature")
    return max_tokens, temperature


def build() -> SimpleNamespace:
    header = gr.Markdown("**Model:** …", elem_id="chat-current-model", elem_classes="sr-chat-head")
    mode = gr.Radio(["Single model", "Side by side"], value="Single model", show_label=False,
                    elem_id="chat-mode")
    with gr.Column(visible=True, elem_id="single-chat") as single:
        chatbot = gr.Chatbot(height=470, elem_id="chatbot", buttons=["copy"],
                             placeholder="Ask the served model anything. "
                                         "Switching models keeps this conversation.")
        with gr.Row():
            prompt = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                elem_id="chat-input", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
            clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
    with gr.Column(visible=False, elem_id="compare-chat") as compare:
        with gr.Row():
            with gr.Column():
                model_a = gr.Dropdown(label="Model A", choices=[], elem_id="compare-model-a")
                bot_a = gr.Chatbot(height=420, elem_id="compare-chatbot-a", show_label=False)
            with gr.Column():
                model_b = gr.Dropdown(label="Model B", choices=[], elem_id="compare-model-b")
                bot_b = gr.Chatbot(height=420, elem_id="compare-chatbot-b", show_label=False)
        with gr.Row():
            cprompt = gr.Textbox(placeholder="One prompt, sent to both models", show_label=False, scale=6,
                                 elem_id="compare-input")
            csend = gr.Button("Send to both", variant="primary", scale=1, elem_id="compare-send")
            cclear = gr.Button("Clear", scale=1, elem_id="compare-clear")
    max_tokens, temperature = _settings()
    return SimpleNamespace(header=header, mode=mode, single=single, chatbot=chatbot, prompt=prompt,
                           send=send, stop=stop, clear=clear, compare=compare, model_a=model_a,
                           model_b=model_b, bot_a=bot_a, bot_b=bot_b, cprompt=cprompt, csend=csend,
                           cclear=cclear, max_tokens=max_tokens, temperature=temperature)


def compare_choices_update(service) -> tuple:
    """Fresh choices for both side-by-side dropdowns (models appear as jobs complete)."""
    try:
        choices, a, b = compare_defaults(service.list_models(), service.current_model())
    except Exception as exc:  # shown in place of the header; the dropdowns keep their choices
        gr.Warning(fmt.error_text(exc))
        return gr.skip(), gr.skip()
    return gr.update(choices=choices, value=a), gr.update(choices=choices, value=b)


def wire(tab: SimpleNamespace, service) -> None:
    settings = [tab.max_tokens, tab.temperature]

    def single(history, prompt, max_tokens, temperature):
        if not (prompt or "").strip():
            yield history, prompt
            return
        for h in stream_reply(service, history, prompt.strip(), None, max_tokens, temperature):
            yield h, ""

    def both(hist_a, hist_b, prompt, model_a, model_b, max_tokens, temperature):
        for a, b in compare_replies(service, (prompt or "").strip(), (model_a, model_b),
                                    (hist_a, hist_b), max_tokens, temperature):
            yield a, b, ""

    chat_io = dict(fn=single, inputs=[tab.chatbot, tab.prompt, *settings],
                   outputs=[tab.chatbot, tab.prompt], concurrency_limit=8)
    events = [tab.prompt.submit(**chat_io), tab.send.click(**chat_io)]
    tab.stop.click(None, None, None, cancels=events)
    tab.clear.click(lambda: [], None, tab.chatbot)
    cmp_io = dict(fn=both, inputs=[tab.bot_a, tab.bot_b, tab.cprompt, tab.model_a, tab.model_b, *settings],
                  outputs=[tab.bot_a, tab.bot_b, tab.cprompt], concurrency_limit=8)
    tab.cprompt.submit(**cmp_io)
    tab.csend.click(**cmp_io)
    tab.cclear.click(lambda: ([], []), None, [tab.bot_a, tab.bot_b])

    def on_mode(mode):
        side = mode == "Side by side"
        updates = compare_choices_update(service) if side else (gr.skip(), gr.skip())
        return gr.update(visible=not side), gr.update(visible=side), *updates

    tab.mode.change(on_mode, tab.mode, [tab.single, tab.compare, tab.model_a, tab.model_b])
