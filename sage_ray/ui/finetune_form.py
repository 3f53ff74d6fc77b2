"""The create-task form: dataset upload with validation and preview, the effective config
and memory estimate before submit, and Start.

The uploaded dataset's server-side path is the one piece of per-page state (a gr.State):
it names a file the service stored, so the job itself never depends on the page.
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import gradio as gr

from sage_ray.config import Method, PresetName, TaskType
from sage_ray.data import METHOD_KINDS
from sage_ray.ui import format as fmt

log = logging.getLogger(__name__)

# The demo defaults: two epochs at 1e-3 make a small model's fine-tune visible in minutes.
DEFAULT_EPOCHS = 2
DEFAULT_LR = 1e-3
DEFAULT_TASK = "chat"
# Order of the values the form's callbacks receive (after the dataset path state).
FORM_FIELDS = ("model", "task", "preset", "epochs", "batch_size", "lr", "lora_r",
               "lora_alpha", "max_length", "grad_accum", "merge", "name", "method", "beta",
               "val_data", "validation_split", "eval_steps", "keep")
SPLIT_CHOICES = ["auto", "0", "0.05", "0.1", "0.2"]
SPLIT_INFO = "auto: 10% of datasets of 50+ records"
# The method an upload switches the form to when the one chosen cannot train its records.
METHOD_FOR_KIND = {"sft": "sft", "pairs": "dpo", "labelled": "kto"}
METHOD_INFO = "sft: replies; dpo / orpo: chosen vs rejected pairs; kto: replies labelled good or bad."
PRESET_INFO = "0: the preset's"
NO_DATASET = "Upload a dataset (JSON array or JSONL) to see the effective config and memory estimate."


def _opt_int(value: Any) -> int | None:
    """Blank or 0 means 'the preset's value' (Gradio sends an empty Number as 0)."""
    if value in (None, "", 0) or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _opt_float(value: Any) -> float | None:
    if value in (None, "") or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def build_request(form: dict) -> dict:
    """The form's values as a plan_job/create_job request; blanks mean 'the preset's'."""
    name = (form.get("name") or "").strip() or None
    return {
        "model": (form.get("model") or "").strip() or None,
        "data": form.get("data") or None,
        "task": form.get("task") or "custom",
        "preset": form.get("preset") or "auto",
        "epochs": _opt_float(form.get("epochs")),
        "batch_size": _opt_int(form.get("batch_size")),
        "lr": _opt_float(form.get("lr")),
        "lora": {"r": _opt_int(form.get("lora_r")), "alpha": _opt_int(form.get("lora_alpha"))},
        "max_length": _opt_int(form.get("max_length")),
        "grad_accum": _opt_int(form.get("grad_accum")),
        "merge": bool(form.get("merge")),
        "name": name,
        "method": form.get("method") or "sft",
        # 0 (Gradio's empty Number) means the default; beta only exists for the preference methods
        "beta": (_opt_float(form.get("beta")) or None) if form.get("method") in ("dpo", "orpo", "kto") else None,
        "val_data": form.get("val_data") or None,
        "validation_split": None if form.get("validation_split") in (None, "", "auto") else float(form["validation_split"]),
        "eval_steps": _opt_int(form.get("eval_steps")),
        "keep": form.get("keep") or "last",
    }


def plan_html(plan: dict) -> str:
    """The memory estimate and whether it fits, shown next to the effective config."""
    memory = plan.get("memory") or {}
    total = memory.get("total_gib")
    head = f"{float(total):.2f} GiB" if total is not None else "unknown"
    kind = "ok" if plan.get("fits", True) else "bad"
    verdict = "fits" if plan.get("fits", True) else "does not fit"
    out = [
        f'<div class="sr-notice sr-{kind}"><b>Estimated memory: {html.escape(head)}</b>'
        f' on {html.escape(str(plan.get("device") or "?"))} — {verdict}</div>'
    ]
    if memory.get("text"):
        out.append(f'<pre class="sr-mem">{html.escape(str(memory["text"]))}</pre>')
    if plan.get("warning"):
        out.append(fmt.error_html(str(plan["warning"])))
    return "".join(out)


def dataset_summary_md(info: dict) -> str:
    formats = info.get("formats") or {}
    mix = ", ".join(f"{name} {count}" for name, count in sorted(formats.items()))
    text = f"✓ **{info.get('filename')}**: {info.get('records')} records, format **{info.get('format')}**"
    if info.get("kind") in ("pairs", "labelled"):
        text += (" (preference pairs: method dpo, orpo or kto)" if info["kind"] == "pairs"
                 else " (labelled replies: method kto)")
    return text + (f" ({mix})" if len(formats) > 1 else "")


def _block(title: str, text: Any, open_: bool = False) -> str:
    return (f'<details class="sr-preview" {"open" if open_ else ""}><summary>{html.escape(title)}</summary>'
            f"<pre>{html.escape(str(text or ''))}</pre></details>")


def dataset_preview_html(info: dict) -> str:
    """The first records exactly as the model sees them (chat template applied); preference
    records as their prompt and each reply that follows it."""
    blocks = []
    for i, example in enumerate(info.get("preview") or [], start=1):
        if "prompt" not in example:
            blocks.append(_block(f"Record {i} as the model sees it", example.get("rendered"), i == 1))
            continue
        label = example.get("label")
        judged = "" if label is None else " (desirable)" if label else " (undesirable)"
        parts = [_block(f"Record {i}: prompt", example["prompt"], i == 1)]
        parts += [_block(f"Record {i}: {key}{judged if key == 'completion' else ''}", example[key], i == 1)
                  for key in ("chosen", "rejected", "completion") if key in example]
        blocks.append("".join(parts))
    return "".join(blocks)


def method_for(info: dict, method: str | None) -> str:
    """`method` when it can train the uploaded records, else the one that can."""
    kind = info.get("kind") or "sft"
    return method if method and kind in METHOD_KINDS.get(method, ()) else METHOD_FOR_KIND[kind]


def upload(service, file_path: str | None) -> dict:
    """Validate the uploaded file through the service and preview its first records."""
    if not file_path:
        return {"data": None, "summary": "", "error": gr.update(value="", visible=False), "preview": ""}
    path = Path(file_path)
    try:
        info = service.upload_dataset(path.name, path.read_bytes())
    except Exception as exc:  # the service names file, line, field and the fix
        return {"data": None, "summary": "",
                "error": gr.update(value=fmt.error_html(fmt.error_text(exc)), visible=True),
                "preview": ""}
    return {"data": info["path"], "summary": dataset_summary_md(info), "info": info,
            "error": gr.update(value="", visible=False), "preview": dataset_preview_html(info)}


def form_request(data: str | None, values: tuple) -> dict:
    return build_request({"data": data, **dict(zip(FORM_FIELDS, values))})


def plan(service, data: str | None, *values) -> dict:
    """The effective config (YAML) and memory estimate for the form as it stands."""
    if not data:
        return {"yaml": "", "plan": fmt.notice_html(NO_DATASET, "idle")}
    try:
        result = service.plan_job(form_request(data, values))
    except Exception as exc:  # a bad value: say which and keep the last YAML out of sight
        return {"yaml": "", "plan": fmt.error_html(fmt.error_text(exc))}
    return {"yaml": result.get("yaml") or "", "plan": plan_html(result)}


def submit(service, data: str | None, *values) -> dict:
    """Create the job; on success the new task becomes the selected one."""
    if not data:
        return {"status": fmt.error_html("Upload a dataset first."), "selected": gr.skip()}
    try:
        job = service.create_job(form_request(data, values))
    except Exception as exc:  # shown under the button; nothing was started
        return {"status": fmt.error_html(fmt.error_text(exc)), "selected": gr.skip()}
    message = f"Started {job['task_id']} ({job.get('status', 'queued')}). Follow it in the task table."
    return {"status": fmt.notice_html(message, "ok"), "selected": job["task_id"]}


def _optional_int(label: str, elem_id: str) -> gr.Number:
    # Gradio sends an empty Number as 0, so 0 is the "take the preset's value" spelling.
    return gr.Number(label=label, value=0, precision=0, info=PRESET_INFO, elem_id=elem_id)


def _basic_fields() -> dict:
    with gr.Row():
        fields = {
            "model": gr.Dropdown(label="Base model", choices=[], value=None, allow_custom_value=True,
                                 info="Registered base, local folder, hub id or 'demo'.",
                                 scale=2, elem_id="base-model"),
            "task": gr.Dropdown(label="Task type", choices=list(get_args(TaskType)), value=DEFAULT_TASK,
                                info="Informational: names the task.", scale=1, elem_id="task-type"),
            "preset": gr.Dropdown(label="Memory preset", choices=list(get_args(PresetName)), value="auto",
                                  info="auto: by free GPU memory, else cpu.", scale=1, elem_id="preset"),
            "method": gr.Dropdown(label="Method", choices=list(get_args(Method)), value="sft",
                                  info=METHOD_INFO, scale=1, elem_id="method"),
        }
    with gr.Row():
        fields["epochs"] = gr.Number(label="Epochs", value=DEFAULT_EPOCHS, info="fractions allowed",
                                     elem_id="epochs")
        fields["batch_size"] = _optional_int("Batch size", "batch-size")
        fields["lr"] = gr.Number(label="Learning rate", value=DEFAULT_LR, info="peak, cosine schedule",
                                 elem_id="learning-rate")
        fields["lora_r"] = _optional_int("LoRA rank", "lora-rank")
    return fields


def _advanced_fields() -> dict:
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        with gr.Row():
            fields = {
                "lora_alpha": _optional_int("LoRA alpha", "lora-alpha"),
                "max_length": _optional_int("Max length (tokens)", "max-length"),
                "grad_accum": _optional_int("Gradient accumulation", "grad-accum"),
                "beta": gr.Number(label="Beta (dpo / orpo / kto)", value=0, info="0: the default, 0.1",
                                  elem_id="beta"),
            }
        with gr.Row(equal_height=True):
            fields["name"] = gr.Textbox(label="Task name", placeholder="blank: <task>_<date>_<time>",
                                        elem_id="task-name")
            fields["merge"] = gr.Checkbox(label="Merge the adapter into a full model after training",
                                          value=False, elem_id="merge-after")
        fields.update(_validation_fields())
    return fields


def _validation_fields() -> dict:
    """Evaluation (sft): a validation file or a held-out share, how often, which adapter to export."""
    val_file = gr.File(label="Validation file (optional, JSON or JSONL): eval loss on it instead of a held-out share",
                       file_types=[".json", ".jsonl"], type="filepath", height=80, elem_id="val-upload")
    with gr.Row(equal_height=True):
        fields = {
            "validation_split": gr.Dropdown(label="Held out for evaluation", choices=SPLIT_CHOICES, value="auto",
                                            allow_custom_value=True, info=SPLIT_INFO, elem_id="validation-split"),
            "eval_steps": gr.Number(label="Evaluate every N steps", value=0, precision=0,
                                    info="0: about 10 times per run", elem_id="eval-steps"),
            "keep": gr.Dropdown(label="Adapter exported", choices=["last", "best"], value="last",
                                info="best: the lowest eval loss", elem_id="keep"),
        }
    fields["val_data"] = gr.Textbox(visible=False, elem_id="val-data")  # the stored file's path
    fields["val_status"] = gr.HTML("", elem_id="val-status")
    fields["val_file"] = val_file
    return fields


def build_form() -> SimpleNamespace:
    """Lay out the form (left: inputs, right: what will run); app wiring is in `wire`."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, elem_classes="sr-panel"):
            gr.Markdown("### New fine-tune", elem_classes="sr-h")
            dataset = gr.File(label="Dataset (JSON or JSONL)", file_types=[".json", ".jsonl"],
                              type="filepath", height=110, elem_id="dataset-upload")
            summary = gr.Markdown("", elem_id="dataset-status")
            error = gr.HTML("", visible=False, elem_id="dataset-error")
            preview = gr.HTML("", elem_id="dataset-preview")
            fields = _basic_fields()
            fields.update(_advanced_fields())
            start = gr.Button("Start fine-tune", variant="primary", elem_id="start-button")
            status = gr.HTML("", elem_id="submit-status")
        with gr.Column(scale=2, elem_classes="sr-panel"):
            gr.Markdown("### What will run", elem_classes="sr-h")
            plan_out = gr.HTML(fmt.notice_html(NO_DATASET, "idle"), elem_id="memory-estimate")
            yaml = gr.Code(label="Effective config", language="yaml", interactive=False,
                           visible=False, elem_id="effective-config")
    return SimpleNamespace(dataset=dataset, summary=summary, error=error, preview=preview,
                           fields=fields, start=start, status=status, plan=plan_out, yaml=yaml,
                           data=gr.State(None))


def wire(form: SimpleNamespace, service, selected: gr.State):
    """Upload → validate; any form change → re-plan; Start → create_job.

    Returns Start's event so the caller can refresh the task table right after it.
    """
    inputs = [form.data] + [form.fields[k] for k in FORM_FIELDS]
    plan_outputs = [form.yaml, form.plan]

    def on_upload(file_path, method):
        out = upload(service, file_path)
        # preference data picks a method that trains it (the summary says which kind it is)
        chosen = method_for(out["info"], method) if out.get("info") else method
        return out["data"], out["summary"], out["error"], out["preview"], chosen

    def on_plan(data, *values):
        out = plan(service, data, *values)
        # An empty code box reads as broken: show it only with a config in it.
        return gr.update(value=out["yaml"], visible=bool(out["yaml"])), out["plan"]

    def on_submit(data, *values):
        out = submit(service, data, *values)
        return out["status"], out["selected"]

    def on_val_upload(file_path):
        out = upload(service, file_path)
        if out.get("info"):
            info = out["info"]
            note = fmt.notice_html(f"{info['filename']}: {info['records']} records to evaluate on", "ok")
            return out["data"], note
        return "", out["error"]["value"] if file_path else ""

    form.dataset.change(on_upload, [form.dataset, form.fields["method"]],
                        [form.data, form.summary, form.error, form.preview, form.fields["method"]]
                        ).then(on_plan, inputs, plan_outputs, show_progress="hidden")
    form.fields["val_file"].change(on_val_upload, form.fields["val_file"],
                                   [form.fields["val_data"], form.fields["val_status"]], show_progress="hidden")
    gr.on([form.fields[k].change for k in FORM_FIELDS], on_plan, inputs, plan_outputs,
          trigger_mode="always_last", show_progress="hidden")
    # The button is off while create_job runs (a Ray job submission takes seconds), so a
    # second click cannot start the same fine-tune twice.
    submitted = form.start.click(lambda: gr.update(interactive=False), None, form.start, queue=False
                                 ).then(on_submit, inputs, [form.status, selected])
    submitted.then(lambda: gr.update(interactive=True), None, form.start, queue=False)
    return submitted
