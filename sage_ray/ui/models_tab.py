"""The Models tab: every registered artifact with type, base, size, created and metrics."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from sage_ray.ui import format as fmt


def models_views(service) -> dict:
    """The registry as a table; an empty or unreadable registry says so instead."""
    try:
        models = service.list_models()
    except Exception as exc:  # e.g. the registry actor is restarting: say so, keep the old table
        return {"table": gr.skip(), "empty": gr.update(value=f"⚠ {fmt.error_text(exc)}", visible=True)}
    tuned = sum(1 for m in models if m.get("kind", "base") != "base")
    summary = f"{len(models)} models: {len(models) - tuned} base, {tuned} fine-tuned."
    return {
        "table": fmt.models_frame(models),
        "empty": gr.update(value=fmt.NO_MODELS if not models else summary, visible=True),
    }


def build() -> SimpleNamespace:
    with gr.Row():
        empty = gr.Markdown("", elem_id="models-summary")
        refresh = gr.Button("Refresh", size="sm", scale=0, min_width=110, elem_id="models-refresh")
    table = gr.Dataframe(value=fmt.models_frame([]), headers=fmt.MODEL_COLUMNS, interactive=False,
                         wrap=True, max_height=560, elem_id="models-table",
                         column_widths=["9%", "22%", "8%", "20%", "9%", "13%", "19%"])
    gr.Markdown("Switch the served model from the **Finetune** tab's model card; "
                "`sage llm model show` prints the same list.", elem_classes="sr-hint")
    return SimpleNamespace(empty=empty, refresh=refresh, table=table)


def wire(tab: SimpleNamespace, service, blocks: gr.Blocks, tab_item: gr.Tab) -> None:
    def load():
        views = models_views(service)
        return views["table"], views["empty"]

    outputs = [tab.table, tab.empty]
    for event in (blocks.load, tab.refresh.click, tab_item.select):
        event(load, None, outputs, show_progress="hidden")
