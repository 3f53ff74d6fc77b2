"""The Finetune tab's compare panel: a finished fine-tune against another model (by default the
served one) on the task's held-out prompts, side by side with figures, and a switch gated on
being better.

The comparison runs where `sage finetune compare` runs it (Promotion.compare_events, a Ray
task on the head node); the page shows its progress events as they come. The formatting
below is pure (records in, HTML out), so it is unit-tested without a browser.
"""

from __future__ import annotations

import html
from types import SimpleNamespace
from typing import Any, Iterator

import gradio as gr

from sage_ray.comparison import MAX_EXAMPLES, MAX_LIMIT
from sage_ray.registry.status import JobStatus
from sage_ray.ui import format as fmt

CHOICE_KEYS = ("empty", "body", "task", "against")  # what the page refresh updates here
SERVED = "@served"  # the against dropdown's "whatever is served when Compare is pressed"
HINT = ("Both models answer the fine-tune's held-out prompts (records it never trained on). "
        "Lower held-out loss on the reference replies is better.")
NO_TASKS = "A completed fine-tune with a held-out set can be compared here."
PROMOTE_HINT_HTML = ('<div class="sr-hint">Compares it with the served model again, and switches only if its '
                     'held-out loss is lower.</div>')


# ---- choices ----------------------------------------------------------------------------

def task_choices(jobs: list[dict], models: list[dict]) -> list[tuple[str, str]]:
    """(label, task id) of the completed tasks that have a model, newest first."""
    kinds: dict[str, str] = {}
    for m in models:  # a merged model wins over the adapter, as compare picks it
        if m.get("task_id") and kinds.get(m["task_id"]) != "merged":
            kinds[m["task_id"]] = m.get("kind") or "lora"
    done = [j for j in fmt.sorted_jobs(jobs) if j.get("status") == JobStatus.COMPLETED and j["task_id"] in kinds]
    return [(f"{j['task_id']} ({fmt.KIND_LABELS.get(kinds[j['task_id']], kinds[j['task_id']])})", j["task_id"])
            for j in done]


def against_choices(models: list[dict], current: dict | None) -> list[tuple[str, str]]:
    """'the served model' first (resolved when Compare is pressed), then every registered model."""
    served = (current or {}).get("name")
    label = f"the served model ({fmt.short_model(served)})" if served else "the served model"
    return [(label, SERVED)] + fmt.model_choices(models, current)


def choice_views(jobs: list[dict] | None, models: list[dict] | None, current: dict | None,
                 selected: str | None = None) -> dict:
    """The panel's choices, from the page refresh's own reads (None: a read failed, keep them).

    The fine-tune offered is the task selected in the table when it can be compared (a job that
    just completed is the one selected), else the newest. The page refresh sends only what
    changed, so a pick in the dropdown stays until the table's selection or the list changes.
    Against keeps the user's pick ("the served model" at first).
    """
    if jobs is None or models is None:
        return {key: gr.skip() for key in CHOICE_KEYS}
    tasks = task_choices(jobs, models)
    ids = [value for _, value in tasks]
    return {
        "empty": gr.update(visible=not tasks),
        "body": gr.update(visible=bool(tasks)),
        "task": gr.update(choices=tasks, value=selected if selected in ids else (ids[0] if ids else None)),
        "against": gr.update(choices=against_choices(models, current)),
    }


# ---- formatting -------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value))


def percent(rate: Any) -> str:
    return fmt.EMPTY if rate is None else f"{float(rate) * 100:.0f}%"


def progress_html(progress: dict | None) -> str:
    """'answering: MODEL done/total' with a bar; before the first answer, that models load."""
    if not progress:
        return '<div class="sr-eval-progress">loading both models…</div>'
    done, total = int(progress.get("done") or 0), int(progress.get("total") or 0)
    width = 100 * done / total if total else 0
    return (f'<div class="sr-eval-progress">answering: <b>{_esc(progress.get("model") or "")}</b> '
            f'{done}/{total}<div class="sr-bar"><span style="width:{width:.0f}%"></span></div></div>')


def verdict(result: dict) -> tuple[str, str]:
    """(kind, sentence): whether the candidate beats the other model on held-out loss."""
    summary = result["summary"]
    mine, theirs = summary["candidate"]["mean_loss"], summary["against"]["mean_loss"]
    names = f"{result['candidate']} against {result['against']}"
    if mine is None or theirs is None:
        return "idle", f"{names}: no reply tokens to score, so no held-out loss to compare."
    figures = f"held-out loss {fmt.fmt_loss(mine)} vs {fmt.fmt_loss(theirs)} on {summary['examples']} prompts"
    if mine < theirs:
        return "ok", f"✓ {result['candidate']} is better than {result['against']}: {figures}."
    return "warn", f"✗ {result['candidate']} is not better than {result['against']}: {figures}."


def summary_html(result: dict) -> str:
    """The verdict, then each model's held-out figures side by side (the better loss marked)."""
    kind, sentence = verdict(result)
    summary = result["summary"]
    mine, theirs = summary["candidate"]["mean_loss"], summary["against"]["mean_loss"]
    better = {"candidate": kind == "ok", "against": kind == "warn" and theirs < mine}
    head = "".join(f'<th>{role}<div class="sr-eval-model">{_esc(result[role])}</div></th>'
                   for role in ("candidate", "against"))
    rows = [("held-out loss (mean, lower is better)", lambda s, role: (
                f'<td class="{"sr-better" if better[role] else ""}">{fmt.fmt_loss(s["mean_loss"])}</td>')),
            ("exact match", lambda s, role: f"<td>{percent(s['exact_match'])}</td>"),
            ("contains the reference", lambda s, role: f"<td>{percent(s['contains_reference'])}</td>")]
    body = "".join(f"<tr><td>{label}</td>{cell(summary['candidate'], 'candidate')}"
                   f"{cell(summary['against'], 'against')}</tr>" for label, cell in rows)
    return (fmt.notice_html(sentence, kind) +
            f'<table class="sr-eval-summary"><thead><tr><th>{summary["examples"]} held-out prompts</th>{head}'
            f"</tr></thead><tbody>{body}</tbody></table>")


def prompt_html(messages: list[dict]) -> str:
    """The last user turn, and how many turns came before it."""
    turns = [m for m in messages or [] if isinstance(m.get("content"), str)]
    if not turns:
        return fmt.EMPTY
    earlier = len(turns) - 1
    more = f'<div class="sr-hint">+{earlier} earlier turn{"s" * (earlier > 1)}</div>' if earlier else ""
    return f'<div class="sr-cell">{_esc(turns[-1]["content"])}</div>{more}'


def _answer(answer: dict, other: dict) -> str:
    marks = "exact match" if answer.get("exact_match") else "contains the reference" \
        if answer.get("contains_reference") else ""
    tag = f'<span class="sr-badge sr-ok">{marks}</span>' if marks else ""
    lower = answer["loss"] < other["loss"]
    return (f'<td><div class="sr-cell">{_esc(answer["output"]) or fmt.EMPTY}</div>{tag}</td>'
            f'<td class="sr-num {"sr-better" if lower else ""}">{fmt.fmt_loss(answer["loss"])}</td>')


# the answers get as much room as the reference; the losses just their figures
COLUMNS = "<colgroup>" + "".join(f'<col style="width:{w}%">' for w in (4, 17, 23, 21, 7, 21, 7)) + "</colgroup>"


def examples_html(result: dict) -> str:
    """Prompt, reference, and each model's answer and loss, one row per held-out prompt."""
    head = "".join(f'<th>{role} answer<div class="sr-eval-model">{_esc(result[role])}</div></th><th>loss</th>'
                   for role in ("candidate", "against"))
    rows = "".join(
        f'<tr><td class="sr-num">{i}</td><td>{prompt_html(row["prompt"])}</td>'
        f'<td><div class="sr-cell">{_esc(row["reference"])}</div></td>'
        f'{_answer(row["candidate"], row["against"])}{_answer(row["against"], row["candidate"])}</tr>'
        for i, row in enumerate(result["examples"], 1))
    return (f'<table class="sr-eval-table">{COLUMNS}<thead><tr><th>#</th><th>prompt</th><th>reference</th>{head}</tr>'
            f"</thead><tbody>{rows}</tbody></table>")


def promote_html(answer: dict) -> str:
    """A gated switch that happened: the model, the service's message and the figures it passed."""
    model = (answer.get("model") or {}).get("name") or fmt.EMPTY
    figures = answer.get("comparison") or {}
    text = f"{model}: {answer.get('message')}"
    if figures:
        text += (f" (held-out loss {fmt.fmt_loss(figures['candidate']['mean_loss'])} vs "
                 f"{fmt.fmt_loss(figures['against']['mean_loss'])} on {figures['examples']} prompts)")
    return fmt.notice_html(text, "ok")


def refusal_html(exc: BaseException) -> str:
    """A refused gated switch says why; its figures come from the error's detail."""
    detail = exc.detail() if callable(getattr(exc, "detail", None)) else {}
    figures = (detail or {}).get("comparison")
    if not figures:
        return fmt.error_html(fmt.error_text(exc))
    return fmt.notice_html(str(exc), "warn")


# ---- callbacks --------------------------------------------------------------------------

def run_compare(promotion, task: str | None, against: str | None, limit: Any) -> Iterator[dict]:
    """Yield the panel's views as the comparison goes: progress lines, then the summary and rows.
    A user error (no held-out set, unknown model, a bad limit) ends it as a readable message."""
    idle = {"run": gr.update(interactive=True)}
    if not task:
        yield {**idle, "progress": fmt.notice_html("Pick a completed fine-tune first.", "idle")}
        return
    hidden = {"result_box": gr.update(visible=False), "candidate": None}
    yield {**hidden, "run": gr.update(interactive=False), "progress": progress_html(None)}
    try:
        limit = int(limit) if limit not in (None, "") else MAX_EXAMPLES
        for event in promotion.compare_events(task, against=None if against in (None, SERVED) else against,
                                              limit=limit):
            if "progress" in event:
                yield {"progress": progress_html(event["progress"])}
            elif "result" in event:
                result = event["result"]
                yield {**idle, "progress": "", "result_box": gr.update(visible=True), "candidate": task,
                       "summary": summary_html(result), "table": examples_html(result),
                       "promote_status": PROMOTE_HINT_HTML}
                return
    except Exception as exc:  # a ServiceError says what to do; anything else names itself
        yield {**idle, **hidden, "progress": fmt.error_html(f"compare {task}: {fmt.error_text(exc)}")}
        return
    yield {**idle, "progress": fmt.error_html(f"compare {task}: the comparison ended without a result")}


def promote(promotion, task: str | None, who: str | None) -> Iterator[str]:
    """Switch to the task's model only if it beats the served one; say which happened."""
    if not task:
        yield fmt.notice_html("Compare a fine-tune first.", "idle")
        return
    yield fmt.notice_html(f"Comparing {task} with the served model, then switching if it is better…", "idle")
    try:
        answer = promotion.switch(task, require_better=True, who=who)
    except Exception as exc:  # 409: not better (with figures); 4xx: cannot be judged
        yield refusal_html(exc)
        return
    yield promote_html(answer)


# ---- layout and wiring ------------------------------------------------------------------

def build_panel() -> SimpleNamespace:
    with gr.Column(elem_classes="sr-panel", elem_id="eval-panel"):
        gr.Markdown("### Compare on held-out prompts", elem_classes="sr-h")
        empty = gr.Markdown(NO_TASKS, elem_id="eval-empty", elem_classes="sr-empty")
        with gr.Column(visible=False, elem_id="eval-body") as body:
            gr.Markdown(HINT, elem_classes="sr-hint")
            with gr.Row(elem_id="eval-controls"):
                task = gr.Dropdown(label="Fine-tune", choices=[], scale=3, elem_id="eval-task")
                against = gr.Dropdown(label="Against", choices=against_choices([], None), value=SERVED, scale=3,
                                      elem_id="eval-against")
                limit = gr.Number(label="Max prompts", value=MAX_EXAMPLES, precision=0, minimum=1,
                                  maximum=MAX_LIMIT, scale=1, min_width=120, elem_id="eval-limit")
                run = gr.Button("Compare", variant="primary", scale=1, min_width=120, elem_id="eval-run")
            progress = gr.HTML("", elem_id="eval-progress", elem_classes="sr-collapse")
            with gr.Column(visible=False, elem_id="eval-result") as result_box:
                summary = gr.HTML("", elem_id="eval-summary")
                with gr.Row(elem_id="eval-promote-row"):
                    promote_btn = gr.Button("Serve it if better", size="sm", scale=0, min_width=160,
                                            elem_id="eval-promote")
                    promote_status = gr.HTML(PROMOTE_HINT_HTML, elem_id="eval-promote-status")
                table = gr.HTML("", elem_id="eval-table")
    return SimpleNamespace(empty=empty, body=body, task=task, against=against, limit=limit, run=run,
                           progress=progress, result_box=result_box, summary=summary, promote=promote_btn,
                           promote_status=promote_status, table=table, candidate=gr.State(None))


def wire(panel: SimpleNamespace, promotion, after_switch: dict, who) -> None:
    """`after_switch`: the .then() that refreshes the page once a gated switch happened;
    `who(request)`: the name a switch is recorded under. The choices come with the page refresh."""
    run_keys = ("run", "progress", "result_box", "candidate", "summary", "table", "promote_status")

    def on_run(task, against, limit):
        for views in run_compare(promotion, task, against, limit):
            yield [views.get(k, gr.skip()) for k in run_keys]

    panel.run.click(on_run, [panel.task, panel.against, panel.limit], [getattr(panel, k) for k in run_keys],
                    show_progress="hidden")

    def on_promote(task, request: gr.Request):
        yield from promote(promotion, task, who(request))

    panel.promote.click(on_promote, panel.candidate, panel.promote_status,
                        show_progress="hidden").then(**after_switch)
