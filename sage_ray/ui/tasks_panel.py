"""The task table, the selected task's live loss chart and logs, and its action buttons.

The selected task id is the page's only state here; every tick re-reads the jobs from
the service, so a job started from the CLI or another browser shows up by itself.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import gradio as gr

from sage_ray.ui import format as fmt

log = logging.getLogger(__name__)

LOG_TAIL = 200
FULL_LOG_TAIL = 5000
ACTIONS = ("chat", "logs", "cancel", "merge", "delete", "resume")
BUTTONS = {  # action: (label, variant)
    "chat": ("Use for chat", "primary"),
    "logs": ("View full log", "secondary"),
    "cancel": ("Cancel", "secondary"),
    "merge": ("Merge", "secondary"),
    "delete": ("Delete", "stop"),
    "resume": ("Resume", "secondary"),
}
NO_LOGS = "(no log lines yet)"


def _read_job(service, jobs: list[dict], task_id: str | None) -> dict | None:
    """The full record of the selected task (the list may carry a lighter one)."""
    if task_id is None:
        return None
    try:
        return service.get_job(task_id)
    except Exception as exc:  # gone between list and get (deleted elsewhere): use the list's
        log.info("get_job(%s) failed: %s", task_id, exc)
        return next((j for j in jobs if j["task_id"] == task_id), None)


def _read_logs(service, task_id: str | None, tail: int) -> str:
    if task_id is None:
        return ""
    try:
        text = service.job_logs(task_id, tail=tail)
    except Exception as exc:  # a log that cannot be read is said in the log view itself
        return f"[could not read the log: {fmt.error_text(exc)}]"
    # progress lines already say step, loss and speed: the EVENT json beside them is for machines
    return "\n".join(line for line in (text or "").splitlines() if " EVENT {" not in line) or NO_LOGS


def task_views(service, selected: str | None, tail: int = LOG_TAIL) -> dict:
    """Everything the task panel shows, read fresh from the service."""
    try:
        jobs = service.list_jobs()
    except Exception as exc:  # keep the page alive; the message says what broke
        unchanged = ("table", "table_box", "detail", "summary", "plot", "logs",
                     *(f"btn_{a}" for a in ACTIONS))
        return {**{k: gr.skip() for k in unchanged}, "selected": selected, "active": False, "jobs": None,
                "empty": gr.update(value=f"⚠ {fmt.error_text(exc)}", visible=True)}
    task_id = fmt.pick_task(jobs, selected)
    job = _read_job(service, jobs, task_id)
    enabled = fmt.job_actions(job)
    return {
        "table": fmt.jobs_frame(jobs),
        "empty": gr.update(value=fmt.NO_JOBS, visible=not jobs),
        # Table and detail stay hidden until there is something to show.
        "table_box": gr.update(visible=bool(jobs)),
        "detail": gr.update(visible=job is not None),
        "selected": task_id,
        "summary": fmt.job_summary_md(job),
        "plot": fmt.loss_frame(job),
        "logs": _read_logs(service, task_id, tail),
        "active": fmt.any_active(jobs),
        "jobs": jobs,  # the compare panel's choices come from the same read
        **{f"btn_{a}": gr.update(interactive=enabled[a]) for a in ACTIONS},
    }


def selected_from_row(row_value: list | None) -> str | None:
    """The task id of a clicked table row (its first column)."""
    return str(row_value[0]) if row_value else None


def run_action(service, action: str, task_id: str | None) -> str:
    """Cancel / merge / delete / resume the selected task; returns the status line."""
    if not task_id:
        return fmt.notice_html("Select a task in the table first.", "idle")
    calls = {
        "cancel": (service.cancel_job, "Cancelling {id}."),
        "merge": (service.merge_job, "Merged {id}: the merged model is in the model list."),
        "delete": (service.delete_job, "Deleted {id} and its files."),
        "resume": (service.resume_job, "Resumed {id} from its last checkpoint."),
    }
    call, message = calls[action]
    try:
        call(task_id)
    except Exception as exc:  # e.g. 409: cancelling a finished job; the service says why
        return fmt.error_html(f"{action} {task_id}: {fmt.error_text(exc)}")
    return fmt.notice_html(message.format(id=task_id), "ok")


def build_panel() -> SimpleNamespace:
    with gr.Column(elem_classes="sr-panel"):
        gr.Markdown("### Fine-tune tasks", elem_classes="sr-h")
        empty = gr.Markdown(fmt.NO_JOBS, elem_id="task-empty", elem_classes="sr-empty")
        with gr.Column(visible=False, elem_id="task-list") as table_box:
            table = gr.Dataframe(value=fmt.jobs_frame([]), headers=fmt.JOB_COLUMNS, interactive=False,
                                 wrap=True, max_height=320, elem_id="task-table",
                                 column_widths=["26%", "18%", "22%", "10%", "10%", "14%"])
        with gr.Column(visible=False, elem_id="task-detail") as detail:
            summary = gr.Markdown(fmt.job_summary_md(None), elem_id="task-summary")
            with gr.Row(elem_id="task-actions"):
                buttons = {a: gr.Button(BUTTONS[a][0], variant=BUTTONS[a][1], size="sm",
                                        interactive=False, elem_id=f"task-{a}") for a in ACTIONS}
            action_status = gr.HTML("", elem_id="task-action-status")
            with gr.Row(equal_height=False):
                plot = gr.LinePlot(value=fmt.loss_frame(None), x="step", y="value", color="series", title="Training loss",
                                   height=300, scale=1, elem_id="loss-plot")
                logs = gr.Textbox(label="Log of the selected task", lines=14, max_lines=14,
                                  autoscroll=True, interactive=False, buttons=["copy"], scale=1,
                                  elem_id="task-logs")
    return SimpleNamespace(empty=empty, table_box=table_box, table=table, detail=detail,
                           summary=summary, buttons=buttons, action_status=action_status,
                           plot=plot, logs=logs, tail=gr.State(LOG_TAIL))
