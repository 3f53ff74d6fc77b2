"""The "current model" card, the hot-switch dropdown, Roll back and the recent switches.

Everything is read from the service on each call: the page keeps no copy of which model
is served, so a second browser or a reload shows the same thing.
"""

from __future__ import annotations

import html
import logging
from types import SimpleNamespace

import gradio as gr

from sage_ray.ui import format as fmt

log = logging.getLogger(__name__)

SWITCH_HINT = "Pick a model to serve it now; chat and the OpenAI API use it at once."
HISTORY_SHOWN = 5


def model_views(service) -> dict:
    """Card, dropdown and chat header for the served model, plus the choice list and the records
    they were made from (the compare panel's choices come from the same read).

    A failing read is shown on the card instead of raising, so one broken call never
    leaves the page blank.
    """
    try:
        models = service.list_models()
        current = service.current_model()
    except Exception as exc:  # the card is where the user looks for model trouble
        log.warning("reading models failed: %s", exc)
        message = fmt.error_text(exc)
        return {"card": fmt.error_html(message), "dropdown": gr.skip(),
                "chat_header": f"⚠ {message}", "choices": None, "models": None, "current": None}
    choices = fmt.model_choices(models, current)
    value = fmt.current_choice(models, current)
    dropdown = gr.update(choices=choices, value=value, info=_path_info(models, current, value))
    return {
        "card": fmt.model_card_html(current) + fmt.paths_holder_html(models, current),
        "dropdown": dropdown,
        "chat_header": chat_header_md(current),
        "choices": choices,
        "models": models,
        "current": current,
    }


def _path_info(models: list[dict], current: dict | None, value: str | None) -> str:
    path = fmt.model_path(models, value) or (current or {}).get("path") or ""
    return f"path: {path}" if path else SWITCH_HINT


def chat_header_md(current: dict | None) -> str:
    if not current or not current.get("name"):
        return "**Model:** none served yet — pick one on the Finetune tab."
    state = current.get("state") or "not serving"
    kind = fmt.KIND_LABELS.get(current.get("kind") or "", current.get("kind") or "")
    return f"**Model:** {current['name']} ({kind}) · {state}"


def who_of(request) -> str:
    """Who switched, for the switch history: the page's user (with --api-key) or its address."""
    name = getattr(request, "username", None) or getattr(getattr(request, "client", None), "host", None)
    return f"{name or 'unknown'} (web UI)"


def switch(service, ref: str | None, who: str | None = None) -> dict:
    """Hot-switch to `ref` and say what happened, in the service's own words."""
    if not ref:
        return {"status": fmt.notice_html("Pick a model first.", "idle"), **model_views(service)}
    try:
        result = service.switch_model(ref, who=who)
    except Exception as exc:  # shown next to the dropdown, the page stays usable
        status = fmt.error_html(f"Could not switch to {ref}: {fmt.error_text(exc)}")
    else:
        model = result.get("model") or {}
        status = fmt.notice_html(f"{model.get('name') or ref}: {result.get('message')}", "ok")
    return {"status": status, **model_views(service)}


def rollback(service, promotion, who: str | None = None) -> dict:
    """Serve the model the latest switch replaced; the refusal (nothing to roll back) is shown."""
    try:
        result = promotion.rollback(who=who)
    except Exception as exc:  # 409 with nothing recorded: said next to the button
        status = fmt.error_html(f"Could not roll back: {fmt.error_text(exc)}")
    else:
        model = (result.get("model") or {}).get("name") or fmt.EMPTY
        status = fmt.notice_html(f"Rolled back from {fmt.short_model(result.get('rolled_back_from'))} to "
                                 f"{model}: {result.get('message')}", "ok")
    return {"status": status, **model_views(service)}


def switch_line(record: dict) -> str:
    """One switch: when, what, from -> to, who, and a gated switch's figures."""
    figures = record.get("figures") or {}
    passed = (f' · held-out loss {fmt.fmt_loss(figures["candidate"]["mean_loss"])} vs '
              f'{fmt.fmt_loss(figures["against"]["mean_loss"])}') if figures.get("candidate") else ""
    source = fmt.short_model(record.get("from_model")) if record.get("from_model") else "the default"
    return (f'<li><span class="sr-when">{fmt.short_time(record.get("at"))}</span> '
            f'<span class="sr-action sr-{html.escape(record.get("action") or "switch")}">'
            f'{html.escape(record.get("action") or "switch")}</span> '
            f'{html.escape(source)} → <b>{html.escape(fmt.short_model(record.get("to_model")))}</b>'
            f'<span class="sr-who"> · {html.escape(record.get("who") or "unknown")}{html.escape(passed)}</span></li>')


def switches_html(records: list[dict]) -> str:
    """The latest switches, newest first."""
    if not records:
        return '<div class="sr-switches"><div class="sr-hint">No switches recorded yet.</div></div>'
    items = "".join(switch_line(r) for r in records[:HISTORY_SHOWN])
    return (f'<div class="sr-switches"><div class="sr-switches-h">Recent switches '
            f'<span class="sr-hint">· Roll back serves the model the latest one replaced</span></div>'
            f'<ul>{items}</ul></div>')


def history_views(promotion) -> dict:
    """The recent switches, and Roll back enabled only when there is a model to go back to."""
    try:
        records = promotion.history(HISTORY_SHOWN)
    except Exception as exc:  # the history is secondary: say it failed, keep the button usable
        return {"history": fmt.error_html(f"switch history: {fmt.error_text(exc)}"), "rollback": gr.skip()}
    can = bool(records and records[0].get("from_model"))
    return {"history": switches_html(records), "rollback": gr.update(interactive=can)}


def build_card() -> SimpleNamespace:
    """Lay out the card; the caller wires it (it shares outputs with the task table)."""
    with gr.Row(elem_id="current-model", elem_classes="sr-panel", equal_height=False):
        with gr.Column(scale=3, min_width=320):
            gr.Markdown("### Current model", elem_classes="sr-h")
            card = gr.HTML(fmt.model_card_html(None), elem_id="current-model-card")
            history = gr.HTML(switches_html([]), elem_id="switch-history")
        with gr.Column(scale=2, min_width=300):
            with gr.Row(elem_id="switch-row"):
                dropdown = gr.Dropdown(label="Serve another model", info=SWITCH_HINT, choices=[],
                                       value=None, interactive=True, filterable=True, scale=1,
                                       elem_id="model-dropdown")
                rollback_btn = gr.Button("Roll back", size="md", scale=0, min_width=110, interactive=False,
                                         elem_id="rollback-button")
            status = gr.HTML("", elem_id="switch-status", elem_classes="sr-collapse")
    return SimpleNamespace(card=card, dropdown=dropdown, status=status, rollback=rollback_btn, history=history)
