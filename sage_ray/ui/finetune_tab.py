"""The Finetune tab: current model card, create-task form, task table with live chart/logs,
and the compare panel.

One page-level refresh (`refresh`) reads the jobs and the served model from the service
and is run on page load, by a timer, and after every action, so what the page shows is
always the service's state, never a copy kept by the page.
"""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from sage_ray.ui import compare_panel, finetune_form, model_switch, tasks_panel
from sage_ray.ui import format as fmt

log = logging.getLogger(__name__)

# Fast while a job runs so loss and logs feel live; slow when idle, still fast enough
# that a job submitted from the CLI shows up without a reload.
TICK_ACTIVE_S = 1.5
TICK_IDLE_S = 5.0
PANEL_KEYS = ("table", "empty", "table_box", "detail", "summary", "plot", "logs")
VIEW_KEYS = (*PANEL_KEYS,
             *(f"btn_{a}" for a in tasks_panel.ACTIONS), "card", "dropdown", "chat_header",
             *(f"eval_{k}" for k in compare_panel.CHOICE_KEYS), "timer")


def _fingerprint(value) -> str:
    if isinstance(value, pd.DataFrame):
        text = value.to_json()
    elif isinstance(value, dict):
        text = repr(sorted(value.items(), key=lambda kv: kv[0]))
    else:
        text = repr(value)
    return hashlib.sha1(text.encode()).hexdigest()


def is_skip(value) -> bool:
    return isinstance(value, dict) and value == gr.skip()


def dedupe(views: dict, sig: dict | None) -> tuple[dict, dict]:
    """Replace values the page already shows with gr.skip().

    Re-sending an unchanged table or log every tick would reset the user's scroll and
    selection and flicker the chart; the per-page signature remembers what was sent.
    """
    sig = dict(sig or {})
    out = {}
    for key, value in views.items():
        if is_skip(value):
            out[key] = value
            continue
        fp = _fingerprint(value)
        out[key] = gr.skip() if sig.get(key) == fp else value
        sig[key] = fp
    return out, sig


def page_views(service, selected: str | None, tail: int) -> dict:
    """Task panel, served model and the compare panel's choices, read fresh; `timer` paces the
    next tick."""
    tasks = tasks_panel.task_views(service, selected, tail)
    models = model_switch.model_views(service)
    views = {k: tasks[k] for k in PANEL_KEYS}
    views.update({f"btn_{a}": tasks[f"btn_{a}"] for a in tasks_panel.ACTIONS})
    views.update({k: models[k] for k in ("card", "dropdown", "chat_header")})
    choices = compare_panel.choice_views(tasks["jobs"], models["models"], models["current"], tasks["selected"])
    views.update({f"eval_{k}": v for k, v in choices.items()})
    # A plain number returned to a Timer sets its interval.
    views["timer"] = TICK_ACTIVE_S if tasks["active"] else TICK_IDLE_S
    return {"views": views, "selected": tasks["selected"]}


def refresh(service, selected: str | None, tail: int, sig: dict | None, force: bool = False) -> list:
    """Outputs in VIEW_KEYS order, then the selected id and the new signature."""
    page = page_views(service, selected, tail)
    views, new_sig = dedupe(page["views"], None if force else sig)
    return [views[k] for k in VIEW_KEYS] + [page["selected"], new_sig]


def build(service) -> SimpleNamespace:
    """Lay out the tab; `wire` connects it once the chat tab (which shares outputs) exists."""
    card = model_switch.build_card()
    form = finetune_form.build_form()
    panel = tasks_panel.build_panel()
    compare = compare_panel.build_panel()
    return SimpleNamespace(card=card, form=form, panel=panel, compare=compare, selected=gr.State(None),
                           sig=gr.State({}), timer=gr.Timer(TICK_ACTIVE_S))


def base_model_update(service) -> dict:
    """The form's base-model choices, defaulting to the base the Studio serves."""
    try:
        models, current = service.list_models(), service.current_model()
    except Exception as exc:  # the free-text entry still works without the list
        log.warning("reading base models failed: %s", exc)
        return gr.skip()
    return gr.update(choices=fmt.base_model_choices(models, current),
                     value=fmt.default_base_model(models, current))


def wire(tab: SimpleNamespace, service, promotion, blocks: gr.Blocks, chat_header: gr.Markdown) -> None:
    panel, card = tab.panel, tab.card
    outputs = ([getattr(panel, k) for k in PANEL_KEYS]
               + [panel.buttons[a] for a in tasks_panel.ACTIONS]
               + [card.card, card.dropdown, chat_header]
               + [getattr(tab.compare, k) for k in compare_panel.CHOICE_KEYS]
               + [tab.timer, tab.selected, tab.sig])
    state_in = [tab.selected, panel.tail, tab.sig]

    def tick(selected, tail, sig):
        return refresh(service, selected, tail, sig)

    def reload(selected, tail, sig):
        return refresh(service, selected, tail, sig, force=True)

    quiet = dict(show_progress="hidden", queue=True)
    blocks.load(reload, state_in, outputs, **quiet)
    blocks.load(lambda: base_model_update(service), None, tab.form.fields["model"], **quiet)
    tab.timer.tick(tick, state_in, outputs, trigger_mode="always_last", **quiet)

    submitted = finetune_form.wire(tab.form, service, tab.selected)
    submitted.then(tick, state_in, outputs, **quiet)
    history = _wire_card(tab, service, promotion, blocks, chat_header)
    _wire_table(tab, service, state_in, outputs, chat_header, history)

    def after_gated_switch(selected, tail, sig):  # the card's last message is stale now: clear it
        return [""] + reload(selected, tail, sig)

    compare_panel.wire(tab.compare, promotion, dict(fn=after_gated_switch, inputs=state_in,
                                                    outputs=[card.status] + outputs, show_progress="hidden"),
                       model_switch.who_of)


def _wire_card(tab, service, promotion, blocks, chat_header) -> dict:
    """Switch from the dropdown, Roll back, and the recent switches (refreshed whenever the card
    changes: a switch from here, the CLI or another browser). Returns the history's .then()."""
    card = tab.card
    card_out = [card.status, card.card, card.dropdown, chat_header]

    def on_history():
        views = model_switch.history_views(promotion)
        return views["history"], views["rollback"]

    history = dict(fn=on_history, inputs=None, outputs=[card.history, card.rollback], show_progress="hidden")
    gr.on([blocks.load, card.card.change], **history, queue=True)

    def on_switch(ref, request: gr.Request):
        out = model_switch.switch(service, ref, who=model_switch.who_of(request))
        return out["status"], out["card"], out["dropdown"], out["chat_header"]

    def on_rollback(request: gr.Request):
        out = model_switch.rollback(service, promotion, who=model_switch.who_of(request))
        return out["status"], out["card"], out["dropdown"], out["chat_header"]

    # .select, not .input: Gradio 6.31 sends a dropdown's input twice per pick (on the pick and on the
    # blur that follows), which switched twice and recorded both
    card.dropdown.select(on_switch, card.dropdown, card_out).then(**history)
    card.rollback.click(on_rollback, None, card_out).then(**history)
    return history


def _wire_table(tab, service, state_in, outputs, chat_header, history: dict) -> None:
    panel, card = tab.panel, tab.card

    def on_select(evt: gr.SelectData):
        return tasks_panel.selected_from_row(evt.row_value), tasks_panel.LOG_TAIL

    def on_chat(task_id, request: gr.Request):
        if not task_id:
            return fmt.notice_html("Select a task first.", "idle"), gr.skip(), gr.skip(), gr.skip()
        out = model_switch.switch(service, task_id, who=model_switch.who_of(request))
        return out["status"], out["card"], out["dropdown"], out["chat_header"]

    def action(name):
        def on_action(task_id):
            status = tasks_panel.run_action(service, name, task_id)
            return status, (None if name == "delete" else task_id)
        return on_action

    refresh_after = dict(fn=lambda s, t, g: refresh(service, s, t, g, force=True),
                         inputs=state_in, outputs=outputs, show_progress="hidden")
    panel.table.select(on_select, None, [tab.selected, panel.tail]).then(**refresh_after)
    panel.buttons["chat"].click(on_chat, tab.selected,
                                [panel.action_status, card.card, card.dropdown, chat_header]).then(**history)
    panel.buttons["logs"].click(lambda: tasks_panel.FULL_LOG_TAIL, None, panel.tail).then(**refresh_after)
    for name in ("cancel", "merge", "delete", "resume"):
        panel.buttons[name].click(action(name), tab.selected,
                                  [panel.action_status, tab.selected]).then(**refresh_after)
