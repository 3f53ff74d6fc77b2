"""The "current model" card and the hot-switch dropdown.

Everything is read from the service on each call: the page keeps no copy of which model
is served, so a second browser or a reload shows the same thing.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import gradio as gr

from sage_ray.ui import format as fmt

log = logging.getLogger(__name__)

SWITCH_HINT = "Pick a model to serve it now; chat and the OpenAI API use it at once."


def model_views(service) -> dict:
    """Card, dropdown and chat header for the served model, plus the choice list's key.

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
                "chat_header": f"⚠ {message}", "choices": None}
    choices = fmt.model_choices(models, current)
    value = fmt.current_choice(models, current)
    dropdown = gr.update(choices=choices, value=value, info=_path_info(models, current, value))
    return {
        "card": fmt.model_card_html(current) + fmt.paths_holder_html(models, current),
        "dropdown": dropdown,
        "chat_header": chat_header_md(current),
        "choices": choices,
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


def switch(service, ref: str | None) -> dict:
    """Hot-switch to `ref` and say what happened, in the service's own words."""
    if not ref:
        return {"status": fmt.notice_html("Pick a model first.", "idle"), **model_views(service)}
    try:
        result = service.switch_model(ref)
    except Exception as exc:  # shown next to the dropdown, the page stays usable
        status = fmt.error_html(f"Could not switch to {ref}: {fmt.error_text(exc)}")
    else:
        model = result.get("model") or {}
        status = fmt.notice_html(f"{model.get('name') or ref}: {result.get('message')}", "ok")
    return {"status": status, **model_views(service)}


def build_card() -> SimpleNamespace:
    """Lay out the card; the caller wires it (it shares outputs with the task table)."""
    with gr.Row(elem_id="current-model", elem_classes="sr-panel", equal_height=False):
        with gr.Column(scale=3, min_width=320):
            gr.Markdown("### Current model", elem_classes="sr-h")
            card = gr.HTML(fmt.model_card_html(None), elem_id="current-model-card")
        with gr.Column(scale=2, min_width=300):
            dropdown = gr.Dropdown(label="Serve another model", info=SWITCH_HINT, choices=[],
                                   value=None, interactive=True, filterable=True,
                                   elem_id="model-dropdown")
            status = gr.HTML("", elem_id="switch-status")
    return SimpleNamespace(card=card, dropdown=dropdown, status=status)
