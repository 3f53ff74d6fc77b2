"""Pure formatting for the Studio UI: service records (plain dicts) in, display values out.

Nothing here touches Gradio or the service, so every rule the page shows (labels,
table rows, the loss frame, error text) is unit-tested without a browser.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime
from typing import Any, Iterable

import pandas as pd

from sage_ray.registry.status import ACTIVE, RESUMABLE, JobStatus

ACTIVE_STATUSES = ACTIVE  # a job not ended yet
JOB_COLUMNS = ["id", "model", "status", "progress", "loss", "created"]
MODEL_COLUMNS = ["active", "name", "type", "base", "size", "created", "metrics"]
NO_JOBS = "No fine-tune jobs yet — upload a dataset and press **Start fine-tune**."
NO_MODELS = "No models registered yet — the Studio's base model appears once it is served."
KIND_LABELS = {"merged": "merged", "lora": "LoRA", "base": "base"}
STATE_CLASSES = {"active": "ok", "loading": "busy", "failed": "bad", "not serving": "idle"}
EMPTY = "—"


def error_text(exc: BaseException) -> str:
    """The message to show for a failed service call.

    The service's errors carry an HTTP-like `.status` and a message written for the user;
    anything else is a bug, so the type is shown too, to make the report useful.
    """
    if getattr(exc, "status", None) is not None:
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}): {exc}. See the Studio logs."


def error_html(message: str) -> str:
    return f'<div class="sr-error">⚠ {html.escape(message)}</div>'


def notice_html(message: str, kind: str = "ok") -> str:
    return f'<div class="sr-notice sr-{kind}">{html.escape(message)}</div>'


def short_time(value: Any) -> str:
    """An ISO timestamp (or epoch seconds) as 'YYYY-MM-DD HH:MM'; anything else as given."""
    if value in (None, ""):
        return EMPTY
    try:
        if isinstance(value, (int, float)):
            when = datetime.fromtimestamp(value)
        else:
            when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return str(value)
    return when.strftime("%Y-%m-%d %H:%M")


def human_size(num_bytes: Any) -> str:
    """Bytes in binary units (what `du -h` and the GPU memory estimate use)."""
    if num_bytes is None:
        return EMPTY
    size = float(num_bytes)
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def human_duration(seconds: Any) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return EMPTY
    total = max(0, int(round(float(seconds))))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def fmt_loss(loss: Any) -> str:
    return EMPTY if loss is None else f"{float(loss):.4f}"


def short_model(ref: Any) -> str:
    """A model reference as a table cell: the last path component of a local folder."""
    if not ref:
        return EMPTY
    text = str(ref).rstrip("/")
    if text.startswith(("/", "~", ".")):
        return text.rsplit("/", 1)[-1]
    return text


# ---- models ---------------------------------------------------------------------------

def model_label(model: dict) -> str:
    """'[base] name' or '[finetuned] name (merged|LoRA)': the dropdown's grouped labels."""
    kind = model.get("kind") or "base"
    if kind == "base":
        return f"[base] {model['name']}"
    return f"[finetuned] {model['name']} ({KIND_LABELS.get(kind, kind)})"


def _newest_first(models: Iterable[dict]) -> list[dict]:
    return sorted(models, key=lambda m: str(m.get("created_at") or ""), reverse=True)


def model_choices(models: list[dict], current: dict | None = None) -> list[tuple[str, str]]:
    """(label, registry name) pairs: base models first, then fine-tuned ones newest first.

    Gradio's dropdown has no option groups, so the group is the label's prefix and the
    order keeps each group together. The served model is added when the registry does
    not list it, so the dropdown can always show what is active.
    """
    base = sorted((m for m in models if m.get("kind", "base") == "base"), key=lambda m: m["name"])
    tuned = _newest_first(m for m in models if m.get("kind", "base") != "base")
    choices = [(model_label(m), m["name"]) for m in base + tuned]
    if current and current.get("name") and current["name"] not in {v for _, v in choices}:
        choices.insert(0, (model_label(current), current["name"]))
    return choices


def current_choice(models: list[dict], current: dict | None) -> str | None:
    """The dropdown value for the served model: its registry name, matched by name or path."""
    if not current or not current.get("name"):
        return None
    for m in models:
        if m["name"] == current["name"] or (current.get("path") and m.get("path") == current["path"]):
            return m["name"]
    return current["name"]


def model_path(models: list[dict], name: str | None) -> str:
    for m in models:
        if m["name"] == name:
            return m.get("path") or ""
    return ""


def paths_holder_html(models: list[dict], current: dict | None) -> str:
    """A hidden {dropdown label: full path} map; the page script turns it into option hovers.

    Gradio's dropdown options take no tooltip, so the map rides along with the card.
    """
    paths = {model_label(m): m.get("path") or "" for m in models}
    if current and current.get("name") and model_label(current) not in paths:
        paths[model_label(current)] = current.get("path") or ""
    data = html.escape(json.dumps(paths), quote=True)
    return f'<div id="sr-model-paths" hidden data-paths="{data}"></div>'


def base_model_choices(models: list[dict], current: dict | None = None) -> list[tuple[str, str]]:
    """Base models for the training form: labelled by name, valued by local path.

    The path is what the trainer resolves without any registry lookup. The served base is
    added when the registry does not list it (a model built into models/ after the registry
    started, e.g. 'tiny' or 'demo' on first use), so the form shows its name, not a raw path.
    """
    bases = sorted((m for m in models if m.get("kind", "base") == "base"), key=lambda m: m["name"])
    choices = [(m["name"], m.get("path") or m["name"]) for m in bases]
    ref = _served_base_ref(current)
    if ref and not any(ref in (m["name"], m.get("path")) for m in bases):
        choices.insert(0, (current["name"] if current.get("kind") == "base" else short_model(ref), ref))
    return choices


def _served_base_ref(current: dict | None) -> str | None:
    """The base the served model runs on: its own path for a base model, else its base_model."""
    if not current:
        return None
    return current.get("path") if current.get("kind") == "base" else current.get("base_model")


def default_base_model(models: list[dict], current: dict | None) -> str | None:
    """The base the Studio serves: the current model's base, or the current model itself."""
    if current:
        ref = _served_base_ref(current)
        for m in models:
            if m.get("kind", "base") == "base" and ref in (m["name"], m.get("path")):
                return m.get("path") or m["name"]
        if ref:
            return ref
    choices = base_model_choices(models)
    return choices[0][1] if choices else None


def model_card_html(current: dict | None) -> str:
    """The 'current model' card; the full path is in the name's hover title."""
    if not current:
        return '<div class="sr-card"><div class="sr-card-title">No model is served yet.</div></div>'
    state = current.get("state") or "not serving"
    name = html.escape(str(current.get("name") or EMPTY))
    path = html.escape(str(current.get("path") or ""), quote=True)
    kind = KIND_LABELS.get(current.get("kind") or "", current.get("kind") or EMPTY)
    base_ref = str(current.get("base_model") or "")
    base = html.escape(short_model(base_ref) if base_ref else EMPTY)
    rows = [
        f'<div class="sr-card-title"><span class="sr-model-name" title="{path}">{name}</span>'
        f'<span class="sr-badge sr-{STATE_CLASSES.get(state, "idle")}">{html.escape(state)}</span></div>',
        f'<div class="sr-card-meta">type <b>{html.escape(kind)}</b> · base '
        f'<b title="{html.escape(base_ref, quote=True)}">{base}</b></div>',
        f'<div class="sr-card-path" title="{path}">{path or EMPTY}</div>',
    ]
    if current.get("canary"):  # a weighted pair: the canary answers its share of unnamed requests
        canary = current["canary"]
        rows.append(f'<div class="sr-card-meta">canary <b>{html.escape(str(canary["name"]))}</b> answers '
                    f'{float(canary["weight"]):.0%} of the requests that name no model</div>')
    if current.get("error"):
        rows.append(error_html(str(current["error"])))
    return f'<div class="sr-card" id="current-model-card-body">{"".join(rows)}</div>'


def metrics_text(metrics: dict | None) -> str:
    if not metrics:
        return EMPTY
    parts = []
    if metrics.get("final_loss") is not None:
        parts.append(f"loss {float(metrics['final_loss']):.4f}")
    if metrics.get("steps") is not None:
        parts.append(f"{metrics['steps']} steps")
    if metrics.get("tokens_per_s") is not None:
        parts.append(f"{float(metrics['tokens_per_s']):.0f} tok/s")
    known = {"final_loss", "steps", "tokens_per_s"}
    parts += [f"{k} {v}" for k, v in sorted(metrics.items()) if k not in known and v is not None]
    return " · ".join(parts) or EMPTY


def models_rows(models: list[dict]) -> list[list[str]]:
    base = [m for m in models if m.get("kind", "base") == "base"]
    tuned = _newest_first(m for m in models if m.get("kind", "base") != "base")
    return [
        [
            "● active" if m.get("active") else "",
            m["name"],
            KIND_LABELS.get(m.get("kind") or "base", m.get("kind")),
            short_model(m.get("base_model")) if m.get("kind") != "base" else EMPTY,
            human_size(m.get("size_bytes")),
            short_time(m.get("created_at")),
            metrics_text(m.get("metrics")),
        ]
        for m in sorted(base, key=lambda m: m["name"]) + tuned
    ]


def models_frame(models: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(models_rows(models), columns=MODEL_COLUMNS)


# ---- jobs -----------------------------------------------------------------------------

def job_status_text(job: dict) -> str:
    status = job.get("status") or "unknown"
    detail = job.get("status_detail")
    return f"{status} · {detail}" if detail else status


def job_progress_text(job: dict) -> str:
    progress = job.get("progress")
    return EMPTY if progress is None else f"{float(progress):.0f}%"


def sorted_jobs(jobs: list[dict]) -> list[dict]:
    return sorted(jobs, key=lambda j: str(j.get("created_at") or ""), reverse=True)


def jobs_rows(jobs: list[dict]) -> list[list[str]]:
    """The task table, newest first; the first column is the task id the row selects."""
    return [
        [
            job["task_id"],
            short_model((job.get("config") or {}).get("model")),
            job_status_text(job),
            job_progress_text(job),
            fmt_loss(job.get("loss")),
            short_time(job.get("created_at")),
        ]
        for job in sorted_jobs(jobs)
    ]


def jobs_frame(jobs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(jobs_rows(jobs), columns=JOB_COLUMNS)


def any_active(jobs: list[dict]) -> bool:
    return any(j.get("status") in ACTIVE_STATUSES for j in jobs)


def pick_task(jobs: list[dict], selected: str | None) -> str | None:
    """The task whose chart and logs to show: the user's pick while it exists, else the
    newest running job, else the newest job (so a reloaded page shows something useful)."""
    ids = {j["task_id"] for j in jobs}
    if selected in ids:
        return selected
    ordered = sorted_jobs(jobs)
    running = [j for j in ordered if j.get("status") in ACTIVE_STATUSES]
    return (running or ordered or [{"task_id": None}])[0]["task_id"]


# Preference metrics (train/preference.py METRICS) as the chart's legend names them.
METRIC_LABELS = {"rewards/accuracies": "reward accuracy", "rewards/margins": "reward margin",
                 "rewards/chosen": "reward chosen", "rewards/rejected": "reward rejected",
                 "nll_loss": "nll loss", "log_odds_ratio": "log odds ratio", "kl": "kl"}


def loss_frame(job: dict | None) -> pd.DataFrame:
    """loss_history [[step, loss, {metric: value}?], ...] as the LinePlot's long frame
    (x=step, y=value, color=series): the loss raw and smoothed, a DPO/ORPO/KTO run's reward
    metrics, and the eval loss of eval_history."""
    history = (job or {}).get("loss_history") or []
    rows = []
    for point in history:
        step, loss = point[0], point[1]
        if loss is not None:
            rows.append((int(step), float(loss), "loss"))
        for name, value in (point[2] if len(point) > 2 else {}).items():
            if value is not None:
                rows.append((int(step), float(value), METRIC_LABELS.get(name, name)))
    rows += smoothed_loss([(step, value) for step, value, series in rows if series == "loss"])
    for point in (job or {}).get("eval_history") or []:
        rows.append((int(point[0]), float(point[1]), "eval loss"))
    frame = pd.DataFrame(rows, columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64", "series": "str"})


SMOOTHING = 0.8  # weight of the running mean: the raw loss of one batch is noisy


def smoothed_loss(points: list[tuple[int, float]]) -> list[tuple[int, float, str]]:
    """The train loss as an exponential moving average (debiased, as TensorBoard draws it)."""
    rows, mean = [], 0.0
    for count, (step, value) in enumerate(points, 1):
        mean = SMOOTHING * mean + (1 - SMOOTHING) * value
        rows.append((step, mean / (1 - SMOOTHING ** count), "loss (smoothed)"))
    return rows if len(points) > 2 else []


def job_summary_md(job: dict | None) -> str:
    """One line on the selected task: where it is, how fast, and any error."""
    if not job:
        return "Select a task in the table to see its loss curve and logs."
    parts = [f"**{job['task_id']}**", job_status_text(job), job_progress_text(job)]
    if job.get("total_steps"):
        parts.append(f"step {job.get('step') or 0}/{job['total_steps']}")
    if job.get("epoch") is not None:
        parts.append(f"epoch {float(job['epoch']):.2f}")
    if job.get("loss") is not None:
        parts.append(f"loss {fmt_loss(job['loss'])}")
    if job.get("eval_history"):
        parts.append(f"eval loss {fmt_loss(job['eval_history'][-1][1])}")
    if job.get("tokens_per_s"):
        parts.append(f"{float(job['tokens_per_s']):.0f} tok/s")
    if job.get("status") in ACTIVE_STATUSES and job.get("eta_s") is not None:
        parts.append(f"ETA {human_duration(job['eta_s'])}")
    text = " · ".join(parts)
    if job.get("error"):
        text += f"\n\n**Error:** {job['error']}"
    return text


def job_actions(job: dict | None) -> dict[str, bool]:
    """Which task buttons make sense for the job's state (the rest are greyed out)."""
    status = (job or {}).get("status")
    config = (job or {}).get("config") or {}
    return {
        "chat": status == JobStatus.COMPLETED,
        "logs": job is not None,
        "cancel": status in ACTIVE_STATUSES,
        "merge": status == JobStatus.COMPLETED and not config.get("merge"),
        "delete": job is not None and status not in ACTIVE_STATUSES,
        "resume": status in RESUMABLE,
    }
