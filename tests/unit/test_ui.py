"""The Studio UI's formatting and callbacks, on plain dict records: no browser, no Ray."""

from __future__ import annotations

import threading

import gradio as gr
import pytest

from sage_ray.ui import chat_tab, finetune_form, finetune_tab, model_switch, models_tab, tasks_panel
from sage_ray.ui import format as fmt

HOME = "/home/u/.sage"
BASE = {"name": "SmolLM2-135M-Instruct", "kind": "base", "group": "base",
        "path": f"{HOME}/models/SmolLM2-135M-Instruct", "base_model": None, "task_id": None,
        "size_bytes": 538 * 1024**2, "created_at": "2026-11-28T10:00:00", "metrics": None, "active": True}
MERGED = {"name": "chat_20261129_101500", "kind": "merged", "group": "finetuned",
          "path": f"{HOME}/studio_finetune/chat_20261129_101500/merged_model",
          "base_model": BASE["path"], "task_id": "chat_20261129_101500", "size_bytes": 538 * 1024**2,
          "created_at": "2026-11-29T10:15:00", "metrics": {"final_loss": 1.20341, "steps": 40,
                                                          "tokens_per_s": 812.5}, "active": False}
LORA = {"name": "qa_20261130_090000", "kind": "lora", "group": "finetuned",
        "path": f"{HOME}/studio_finetune/qa_20261130_090000/lora", "base_model": BASE["path"],
        "task_id": "qa_20261130_090000", "size_bytes": 3_700_000, "created_at": "2026-11-30T09:00:00",
        "metrics": {"final_loss": 0.8841}, "active": False}
CURRENT = {"name": BASE["name"], "kind": "base", "path": BASE["path"], "base_model": None,
           "state": "active", "error": None}


def job(task_id, status, created, **extra):
    record = {"task_id": task_id, "status": status, "status_detail": None, "progress": 0, "epoch": 0,
              "step": 0, "total_steps": 30, "loss": None, "loss_history": [], "tokens_per_s": None,
              "eta_s": None, "error": None, "log_path": None, "created_at": created, "started_at": None,
              "finished_at": None, "config": {"model": BASE["path"], "task": "chat"}}
    record.update(extra)
    return record


class ServiceError(Exception):
    def __init__(self, status, message, detail=None):
        super().__init__(message)
        self.status = status
        self._detail = detail or {}

    def detail(self):
        return self._detail


class RecordingService:
    """Answers from plain records and remembers the calls the UI made."""

    registry = None  # build_ui's default Promotion(service) only keeps it

    def __init__(self, jobs=(), models=(BASE, MERGED, LORA)):
        self.jobs = {j["task_id"]: j for j in jobs}
        self.models = list(models)
        self.active = dict(CURRENT)
        self.calls = []
        self.switches = []  # newest first, as the registry lists them

    def list_models(self):
        return [dict(m) for m in self.models]

    def current_model(self):
        return dict(self.active)

    def switch_model(self, ref, who=None, action="switch", figures=None):
        self.calls.append(("switch_model", ref))
        found = [m for m in self.models if ref in (m["name"], m["task_id"], m["path"])]
        if not found:
            raise ServiceError(404, f"no model named {ref!r}")
        m, before = found[0], self.active["name"]
        self.active = {"name": m["name"], "kind": m["kind"], "path": m["path"],
                       "base_model": m["base_model"], "state": "active", "error": None}
        self.switches.insert(0, {"id": len(self.switches) + 1, "at": "2026-12-01T10:0{}:00".format(len(self.switches)),
                                 "who": who, "action": action, "from_model": before, "to_model": m["name"],
                                 "figures": figures})
        return {"model": dict(self.active), "message": "switched; takes effect when the LLM service starts"}

    def upload_dataset(self, filename, content):
        self.calls.append(("upload_dataset", filename, content))
        if b"outptu" in content:
            raise ServiceError(400, f"{filename}, line 2: missing required field 'output'")
        return {"path": f"{HOME}/datasets/{filename}", "filename": filename, "records": 2,
                "format": "alpaca", "formats": {"alpaca": 2},
                "preview": [{"messages": [], "rendered": "<|im_start|>user\nhi<|im_end|>"}]}

    def plan_job(self, request):
        self.calls.append(("plan_job", request))
        if request["epochs"] is not None and request["epochs"] <= 0:
            raise ServiceError(400, "epochs: must be greater than 0")
        return {"config": request, "yaml": f"model: {request['model']}\n", "device": "cpu",
                "memory": {"total_gib": 0.75, "text": "0.75 GiB (weights 0.50)"}, "fits": True,
                "warning": None}

    def create_job(self, request):
        self.calls.append(("create_job", request))
        record = job("chat_new", "queued", "2026-11-30T12:00:00", config=request)
        self.jobs["chat_new"] = record
        return dict(record)

    def list_jobs(self):
        return [dict(j) for j in self.jobs.values()]

    def get_job(self, task_id):
        if task_id not in self.jobs:
            raise ServiceError(404, f"no task {task_id}")
        return dict(self.jobs[task_id])

    def job_logs(self, task_id, tail=200):
        return "\n".join(f"{task_id} line {i}" for i in range(tail))[:200]

    def cancel_job(self, task_id):
        if self.jobs[task_id]["status"] in ("completed", "failed", "cancelled"):
            raise ServiceError(409, f"{task_id} already finished")
        self.calls.append(("cancel_job", task_id))
        return self.jobs[task_id]

    def delete_job(self, task_id):
        self.calls.append(("delete_job", task_id))
        del self.jobs[task_id]

    def resume_job(self, task_id):
        self.calls.append(("resume_job", task_id))
        return self.jobs[task_id]

    def merge_job(self, task_id):
        self.calls.append(("merge_job", task_id))
        return self.jobs[task_id]

    def chat_stream(self, messages, model=None, max_tokens=256, temperature=0.7):
        self.calls.append(("chat_stream", messages, model))
        if model == "broken":
            yield "partial "
            raise ServiceError(503, "the model stopped answering")
        for word in f"{model or self.active['name']} answers {messages[-1]['content']}".split():
            yield word + " "


# ---- formatting -----------------------------------------------------------------------

def test_model_choices_group_base_first_then_finetuned_newest_first():
    choices = fmt.model_choices([MERGED, LORA, BASE], CURRENT)
    assert choices == [
        ("[base] SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("[finetuned] qa_20261130_090000 (LoRA)", "qa_20261130_090000"),
        ("[finetuned] chat_20261129_101500 (merged)", "chat_20261129_101500"),
    ]


def test_model_choices_add_a_served_model_the_registry_does_not_list():
    current = {"name": "/data/my-model", "kind": "merged", "path": "/data/my-model", "state": "active"}
    choices = fmt.model_choices([BASE], current)
    assert choices[0] == ("[finetuned] /data/my-model (merged)", "/data/my-model")
    assert fmt.current_choice([BASE], current) == "/data/my-model"


def test_current_choice_matches_by_path_and_model_path_gives_the_hover_text():
    current = {"name": "whatever", "path": MERGED["path"], "kind": "merged"}
    assert fmt.current_choice([BASE, MERGED], current) == MERGED["name"]
    assert fmt.model_path([BASE, MERGED], MERGED["name"]) == MERGED["path"]
    assert fmt.current_choice([BASE], None) is None


def test_default_base_model_is_the_served_models_base_as_a_path():
    served_finetune = {"name": MERGED["name"], "kind": "merged", "path": MERGED["path"],
                       "base_model": BASE["path"], "state": "active"}
    assert fmt.default_base_model([BASE, MERGED], served_finetune) == BASE["path"]
    assert fmt.default_base_model([BASE, MERGED], CURRENT) == BASE["path"]
    assert fmt.base_model_choices([MERGED, BASE]) == [(BASE["name"], BASE["path"])]
    assert fmt.default_base_model([], None) is None


def test_model_card_shows_state_path_on_hover_and_escapes_error():
    html = fmt.model_card_html({**CURRENT, "state": "failed", "error": "<oom> & more"})
    assert f'title="{BASE["path"]}"' in html
    assert "sr-bad" in html and ">failed<" in html
    assert "&lt;oom&gt; &amp; more" in html and "<oom>" not in html
    assert "No model is served" in fmt.model_card_html(None)
    paired = fmt.model_card_html({**CURRENT, "canary": {"name": "<b>ft", "weight": 0.1}})
    assert "canary <b>&lt;b&gt;ft</b> answers 10% of the requests" in paired
    assert "canary" not in fmt.model_card_html(CURRENT)


def test_paths_holder_maps_each_dropdown_label_to_its_full_path():
    import html
    import json
    import re

    holder = fmt.paths_holder_html([BASE, MERGED], {"name": "/x/m", "kind": "lora", "path": "/x/m"})
    data = json.loads(html.unescape(re.search(r'data-paths="([^"]*)"', holder).group(1)))
    assert data == {"[base] SmolLM2-135M-Instruct": BASE["path"],
                    "[finetuned] chat_20261129_101500 (merged)": MERGED["path"],
                    "[finetuned] /x/m (LoRA)": "/x/m"}
    choices = fmt.model_choices([BASE, MERGED], {"name": "/x/m", "kind": "lora"})
    assert set(data) == {label for label, _ in choices}


def test_models_rows_human_sizes_metrics_and_active_marker():
    rows = fmt.models_rows([LORA, MERGED, BASE])
    assert [r[1] for r in rows] == [BASE["name"], LORA["name"], MERGED["name"]]
    assert rows[0][0] == "● active" and rows[1][0] == ""
    assert rows[0][4] == "538.0 MiB" and rows[1][4] == "3.5 MiB"
    assert rows[2][2] == "merged" and rows[1][2] == "LoRA"
    assert rows[2][3] == "SmolLM2-135M-Instruct"
    assert rows[2][6] == "loss 1.2034 · 40 steps · 812 tok/s"
    assert rows[0][5] == "2026-11-28 10:00"
    assert list(fmt.models_frame([]).columns) == fmt.MODEL_COLUMNS


def test_jobs_rows_newest_first_with_status_detail_progress_and_loss():
    jobs = [job("old", "completed", "2026-11-30T09:00:00", progress=100, loss=0.88412),
            job("new", "queued", "2026-11-30T11:00:00", status_detail="waiting for resources")]
    rows = fmt.jobs_rows(jobs)
    assert rows[0] == ["new", "SmolLM2-135M-Instruct", "queued · waiting for resources", "0%", "—",
                       "2026-11-30 11:00"]
    assert rows[1][3:5] == ["100%", "0.8841"]
    assert fmt.any_active(jobs) and not fmt.any_active(jobs[:1])


def test_pick_task_keeps_the_users_pick_else_newest_running_else_newest():
    jobs = [job("done", "completed", "2026-11-30T12:00:00"),
            job("running", "training", "2026-11-30T10:00:00"),
            job("older", "failed", "2026-11-30T09:00:00")]
    assert fmt.pick_task(jobs, "older") == "older"
    assert fmt.pick_task(jobs, "deleted") == "running"
    assert fmt.pick_task(jobs[:1], None) == "done"
    assert fmt.pick_task([], "x") is None


def test_loss_frame_from_loss_history():
    frame = fmt.loss_frame(job("t", "training", "", loss_history=[[1, 2.5], [2, 2.25], [3, None]]))
    assert list(frame.columns) == ["step", "value", "series"]
    assert frame["step"].tolist() == [1, 2] and frame["value"].tolist() == [2.5, 2.25]
    assert set(frame["series"]) == {"loss"}
    assert str(frame["step"].dtype) == "int64" and str(frame["value"].dtype) == "float64"


def test_loss_frame_shows_preference_metrics():
    history = [[1, 0.69, {"rewards/accuracies": 0.0, "rewards/margins": 0.0}],
               [2, 0.6, {"rewards/accuracies": 1.0, "rewards/margins": 0.2}]]
    frame = fmt.loss_frame(job("t", "training", "", loss_history=history))
    accuracy = frame[frame["series"] == "reward accuracy"]
    assert accuracy["step"].tolist() == [1, 2] and accuracy["value"].tolist() == [0.0, 1.0]
    assert frame[frame["series"] == "loss"]["value"].tolist() == [0.69, 0.6]
    assert set(frame["series"]) == {"loss", "reward accuracy", "reward margin"}
    assert fmt.loss_frame(None).empty


def test_job_summary_and_actions_follow_the_status():
    running = job("t", "training", "", progress=40, step=12, total_steps=30, loss=1.5, eta_s=75,
                  tokens_per_s=812.4)
    summary = fmt.job_summary_md(running)
    assert "step 12/30" in summary and "ETA 1m 15s" in summary and "812 tok/s" in summary
    assert fmt.job_actions(running) == {"chat": False, "logs": True, "cancel": True, "merge": False,
                                        "delete": False, "resume": False}
    done = job("t", "completed", "", config={"merge": False})
    assert fmt.job_actions(done)["chat"] and fmt.job_actions(done)["merge"]
    assert not fmt.job_actions({**done, "config": {"merge": True}})["merge"]
    failed = job("t", "failed", "", error="CUDA out of memory")
    assert fmt.job_actions(failed)["resume"] and "**Error:** CUDA out of memory" in fmt.job_summary_md(failed)
    assert not any(v for k, v in fmt.job_actions(None).items())


def test_build_request_blank_or_zero_means_the_presets_value():
    request = finetune_form.build_request({"model": " demo ", "data": "/d.json", "task": "qa", "preset": "cpu",
                                 "epochs": 2, "batch_size": 0, "lr": 1e-3, "lora_r": 8.0,
                                 "lora_alpha": None, "max_length": "", "grad_accum": 4,
                                 "merge": True, "name": "  "})
    assert request == {"model": "demo", "data": "/d.json", "task": "qa", "preset": "cpu", "epochs": 2.0,
                       "batch_size": None, "lr": 1e-3, "lora": {"r": 8, "alpha": None},
                       "max_length": None, "grad_accum": 4, "merge": True, "name": None,
                       "method": "sft", "beta": None, "val_data": None, "validation_split": None,
                       "eval_steps": None, "keep": "last"}


def test_build_request_carries_the_validation_fields():
    request = finetune_form.build_request({"data": "/d.json", "val_data": "/v.jsonl", "validation_split": "auto",
                                           "eval_steps": 5, "keep": "best"})
    assert {k: request[k] for k in ("val_data", "validation_split", "eval_steps", "keep")} == {
        "val_data": "/v.jsonl", "validation_split": None, "eval_steps": 5, "keep": "best"}
    assert finetune_form.build_request({"data": "/d.json", "validation_split": "0.2"})["validation_split"] == 0.2
    assert finetune_form.build_request({"data": "/d.json", "validation_split": "0"})["validation_split"] == 0.0


def test_build_request_carries_method_and_beta_only_where_it_applies():
    dpo = finetune_form.build_request({"data": "/d.json", "method": "dpo", "beta": 0.25})
    assert (dpo["method"], dpo["beta"]) == ("dpo", 0.25)
    assert finetune_form.build_request({"data": "/d.json", "method": "kto", "beta": 0})["beta"] is None  # default
    assert finetune_form.build_request({"data": "/d.json", "method": "sft", "beta": 0.5})["beta"] is None


def test_upload_of_preference_data_picks_a_method_that_trains_it():
    assert finetune_form.method_for({"kind": "pairs"}, "sft") == "dpo"
    assert finetune_form.method_for({"kind": "pairs"}, "orpo") == "orpo"  # already fits: kept
    assert finetune_form.method_for({"kind": "labelled"}, "dpo") == "kto"
    assert finetune_form.method_for({"kind": "sft"}, "kto") == "sft"


def test_preference_preview_shows_prompt_and_each_reply_escaped():
    info = {"kind": "pairs", "preview": [{"prompt": "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
                                          "chosen": "Paris.<|im_end|>\n", "rejected": "Lyon.<|im_end|>\n"}]}
    html = finetune_form.dataset_preview_html(info)
    assert "Record 1: prompt" in html and "Record 1: chosen" in html and "Record 1: rejected" in html
    assert "Paris.&lt;|im_end|&gt;" in html and "&lt;|im_start|&gt;assistant" in html
    kto = finetune_form.dataset_preview_html({"preview": [{"prompt": "p", "completion": "bad", "label": False}]})
    assert "Record 1: completion (undesirable)" in kto


def test_plan_html_says_whether_it_fits_and_shows_the_warning():
    ok = finetune_form.plan_html({"device": "cuda:0 (12 GiB)", "memory": {"total_gib": 7.5, "text": "7.50 GiB"},
                        "fits": True, "warning": None})
    assert "7.50 GiB" in ok and "fits" in ok and "sr-ok" in ok
    bad = finetune_form.plan_html({"device": "cpu", "memory": {"total_gib": 30}, "fits": False,
                         "warning": "use preset <minimal>"})
    assert "does not fit" in bad and "use preset &lt;minimal&gt;" in bad


def test_dataset_preview_shows_rendered_text_escaped():
    info = {"filename": "d.jsonl", "records": 12, "format": "mixed", "formats": {"alpaca": 10, "qa": 2},
            "preview": [{"rendered": "<|im_start|>user\nhi<|im_end|>"}, {"rendered": "second"}]}
    preview = finetune_form.dataset_preview_html(info)
    assert "&lt;|im_start|&gt;user\nhi&lt;|im_end|&gt;" in preview and preview.count("<details") == 2
    assert finetune_form.dataset_summary_md(info).endswith("(alpaca 10, qa 2)")


def test_error_text_distinguishes_service_errors_from_bugs():
    assert fmt.error_text(ServiceError(409, "already finished")) == "already finished"
    text = fmt.error_text(KeyError("task_id"))
    assert text.startswith("Unexpected error (KeyError)") and "Studio logs" in text


@pytest.mark.parametrize("value, text", [(None, "—"), (512, "512 B"), (1536, "1.5 KiB"),
                                         (5 * 1024**3, "5.0 GiB")])
def test_human_size(value, text):
    assert fmt.human_size(value) == text


# ---- callbacks ---------------------------------------------------------------------------

def test_switch_reports_the_services_message_and_refreshes_card_and_dropdown():
    service = RecordingService()
    out = model_switch.switch(service, MERGED["name"])
    assert "switched; takes effect when the LLM service starts" in out["status"]
    assert MERGED["name"] in out["card"] and out["dropdown"]["value"] == MERGED["name"]
    assert out["dropdown"]["info"] == f"path: {MERGED['path']}"
    assert "chat_20261129_101500 (merged)" in out["chat_header"]


def test_switch_error_is_shown_and_the_dropdown_returns_to_the_served_model():
    service = RecordingService()
    out = model_switch.switch(service, "nope")
    assert "sr-error" in out["status"] and "no model named &#x27;nope&#x27;" in out["status"]
    assert out["dropdown"]["value"] == BASE["name"]


def test_upload_error_is_shown_inline_and_keeps_no_dataset(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"instruction": "a", "outptu": "b"}\n')
    out = finetune_form.upload(RecordingService(), str(bad))
    assert out["data"] is None and out["error"]["visible"] is True
    assert "bad.jsonl, line 2: missing required field" in out["error"]["value"]


def test_upload_ok_previews_and_plan_then_submit_use_the_stored_path(tmp_path):
    good = tmp_path / "good.json"
    good.write_bytes(b'[{"instruction": "a", "output": "b"}]')
    service = RecordingService()
    out = finetune_form.upload(service, str(good))
    assert out["data"] == f"{HOME}/datasets/good.json" and out["error"]["visible"] is False
    assert service.calls[0] == ("upload_dataset", "good.json", good.read_bytes())
    values = (BASE["path"], "chat", "auto", 2, 0, 1e-3, 0, 0, 0, 0, False, "")
    planned = finetune_form.plan(service, out["data"], *values)
    assert planned["yaml"] == f"model: {BASE['path']}\n" and "0.75 GiB" in planned["plan"]
    assert service.calls[-1][1]["data"] == out["data"]
    submitted = finetune_form.submit(service, out["data"], *values)
    assert submitted["selected"] == "chat_new" and "Started chat_new" in submitted["status"]


def test_plan_without_dataset_or_with_a_bad_value_says_so():
    service = RecordingService()
    assert "Upload a dataset" in finetune_form.plan(service, None)["plan"]
    values = (BASE["path"], "chat", "auto", -1, 0, 1e-3, 0, 0, 0, 0, False, "")
    bad = finetune_form.plan(service, "/d.json", *values)
    assert bad["yaml"] == "" and "epochs: must be greater than 0" in bad["plan"]
    assert "Upload a dataset first" in finetune_form.submit(service, None, *values)["status"]


def test_task_views_select_the_running_job_and_show_its_chart_and_logs():
    jobs = [job("done", "completed", "2026-11-30T12:00:00"),
            job("run", "training", "2026-11-30T10:00:00", loss_history=[[1, 2.0], [2, 1.5]])]
    views = tasks_panel.task_views(RecordingService(jobs), None)
    assert views["selected"] == "run" and views["active"] is True
    assert views["table"]["id"].tolist() == ["done", "run"]
    assert views["plot"]["value"].tolist() == [2.0, 1.5]
    assert views["logs"].startswith("run line 0")
    assert views["btn_cancel"]["interactive"] is True and views["btn_chat"]["interactive"] is False
    assert views["empty"]["visible"] is False
    assert views["table_box"]["visible"] is True and views["detail"]["visible"] is True
    empty = tasks_panel.task_views(RecordingService(), None)
    assert empty["empty"]["visible"] is True and "No fine-tune jobs yet" in empty["empty"]["value"]
    assert empty["table_box"]["visible"] is False and empty["detail"]["visible"] is False
    assert empty["table"].empty and empty["selected"] is None


def test_a_failing_service_read_is_shown_and_leaves_the_rest_of_the_page_as_it_was():
    class Down(RecordingService):
        def list_jobs(self):
            raise ServiceError(503, "the registry is restarting; try again in a few seconds")

        def list_models(self):
            raise ConnectionError("actor died")

    views = tasks_panel.task_views(Down(), "kept")
    assert views["selected"] == "kept" and finetune_tab.is_skip(views["table"])
    assert views["empty"]["value"] == "⚠ the registry is restarting; try again in a few seconds"
    models = model_switch.model_views(Down())
    assert finetune_tab.is_skip(models["dropdown"]) and "Unexpected error (ConnectionError)" in models["card"]
    assert "actor died" in models_tab.models_views(Down())["empty"]["value"]


def test_run_action_calls_the_service_and_shows_its_refusal():
    service = RecordingService([job("done", "completed", "2026-11-30T12:00:00")])
    refused = tasks_panel.run_action(service, "cancel", "done")
    assert "sr-error" in refused and "already finished" in refused
    assert "Deleted done" in tasks_panel.run_action(service, "delete", "done")
    assert ("delete_job", "done") in service.calls and not service.jobs
    assert "Select a task" in tasks_panel.run_action(service, "merge", None)
    assert tasks_panel.selected_from_row(["done", "x"]) == "done"


def test_dedupe_skips_what_the_page_already_shows():
    service = RecordingService([job("run", "training", "2026-11-30T10:00:00")])
    first = finetune_tab.refresh(service, None, 200, {})
    keys = finetune_tab.VIEW_KEYS
    assert not any(finetune_tab.is_skip(v) for v in first[:len(keys)])
    second = finetune_tab.refresh(service, first[-2], 200, first[-1])
    assert all(finetune_tab.is_skip(v) for v in second[:len(keys)])
    assert first[keys.index("timer")] == finetune_tab.TICK_ACTIVE_S
    service.jobs["run"]["loss_history"] = [[1, 3.0]]
    third = finetune_tab.refresh(service, first[-2], 200, second[-1])
    changed = {k for k, v in zip(keys, third) if not finetune_tab.is_skip(v)}
    assert changed == {"plot"}
    forced = finetune_tab.refresh(service, first[-2], 200, third[-1], force=True)
    assert not finetune_tab.is_skip(forced[keys.index("table")])


def test_to_messages_reads_gradio6_content_parts_and_drops_error_turns():
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None},
               {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
               {"role": "user", "content": [{"type": "file", "file": {"path": "/x.png"}}]},
               {"role": "assistant", "content": "⚠ the model stopped answering"}]
    assert chat_tab.to_messages(history) == [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]


def test_stream_reply_grows_the_answer_and_keeps_history_across_a_switch():
    service = RecordingService()
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    steps = list(chat_tab.stream_reply(service, history, "q2", None, 64, 0.7))
    assert steps[0][-2:] == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]
    texts = [s[-1]["content"] for s in steps[1:]]
    assert texts == sorted(texts, key=len) and texts[-1] == "SmolLM2-135M-Instruct answers q2 "
    assert service.calls[-1][1][:2] == [{"role": "user", "content": "q1"},
                                        {"role": "assistant", "content": "a1"}]
    service.switch_model(MERGED["name"])
    after = list(chat_tab.stream_reply(service, steps[-1], "q3", None, 64, 0.7))[-1]
    assert after[:4] == steps[-1] and after[-1]["content"].startswith("chat_20261129_101500 answers q3")


def test_stream_reply_shows_the_error_and_keeps_the_partial_text():
    final = list(chat_tab.stream_reply(RecordingService(), [], "q", "broken", 64, 0.7))[-1]
    assert final[-2] == {"role": "assistant", "content": "partial "}
    assert final[-1]["content"] == "⚠ the model stopped answering"


def test_merge_streams_runs_both_at_once():
    # Each stream waits for the other to start: run one after the other, the barrier breaks.
    both_started = threading.Barrier(2, timeout=5)

    def stream(tag):
        def make():
            both_started.wait()
            for i in range(3):
                yield f"{tag}{i}"
        return make

    items = list(chat_tab.merge_streams({"a": stream("a"), "b": stream("b")}, threading.Event()))
    assert sorted(items) == [("a", "a0"), ("a", "a1"), ("a", "a2"), ("b", "b0"), ("b", "b1"), ("b", "b2")]
    assert [i for k, i in items if k == "a"] == ["a0", "a1", "a2"]


def test_compare_replies_streams_both_models_on_one_prompt():
    service = RecordingService()
    final = list(chat_tab.compare_replies(service, "hi", (BASE["name"], LORA["name"]), ([], []), 64, 0.7))[-1]
    assert final[0][-1]["content"] == "SmolLM2-135M-Instruct answers hi "
    assert final[1][-1]["content"] == "qa_20261130_090000 answers hi "
    choices, a, b = chat_tab.compare_defaults([BASE, MERGED, LORA], CURRENT)
    assert a == BASE["name"] and b == LORA["name"] and len(choices) == 3


def test_models_views_table_and_empty_state():
    views = models_tab.models_views(RecordingService())
    assert views["table"]["name"].tolist() == [BASE["name"], LORA["name"], MERGED["name"]]
    assert "3 models: 1 base, 2 fine-tuned" in views["empty"]["value"]
    assert fmt.NO_MODELS == models_tab.models_views(RecordingService(models=()))["empty"]["value"]


def test_build_ui_has_the_elements_the_browser_test_drives():
    from sage_ray.ui import build_ui

    blocks = build_ui(RecordingService())
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    expected = {"model-dropdown", "switch-status", "current-model-card", "dataset-upload",
                "dataset-preview", "dataset-error", "dataset-status", "base-model", "preset", "epochs",
                "learning-rate", "lora-rank", "effective-config", "memory-estimate", "start-button",
                "submit-status", "task-table", "task-summary", "loss-plot", "task-logs", "task-chat",
                "task-cancel", "task-merge", "task-delete", "task-resume", "task-logs", "chat-input",
                "chatbot", "chat-send", "chat-current-model", "chat-mode", "compare-model-a",
                "compare-model-b", "compare-chatbot-a", "compare-chatbot-b", "compare-input",
                "compare-send", "models-table", "models-refresh", "rollback-button", "switch-history",
                "eval-task", "eval-against", "eval-limit", "eval-run", "eval-progress", "eval-summary",
                "eval-table", "eval-promote", "eval-promote-status"}
    assert expected <= ids, expected - ids
    assert isinstance(blocks, gr.Blocks)


def test_base_choices_include_the_served_base_the_registry_lacks():
    cur = {"name": "tiny-qwen2", "kind": "base", "path": "/h/models/tiny-qwen2"}
    assert fmt.base_model_choices([], cur) == [("tiny-qwen2", "/h/models/tiny-qwen2")]
    lora = {"name": "t1", "kind": "lora", "path": "/h/t1/lora", "base_model": "/h/models/tiny-qwen2"}
    assert fmt.base_model_choices([], lora) == [("tiny-qwen2", "/h/models/tiny-qwen2")]


def test_the_log_view_shows_lines_for_people_not_the_event_json():
    from sage_ray.train.callbacks import log_text

    class Logs(RecordingService):
        def job_logs(self, task_id, tail=200):
            event = {"step": 1, "loss": 2.5, "total_steps": 4}
            return log_text("step 1/4 loss 2.5000", event) + log_text("training done")

    views = tasks_panel.task_views(Logs([job("run", "training", "2026-11-30T10:00:00")]), None)
    assert "step 1/4 loss 2.5000" in views["logs"] and "training done" in views["logs"]
    assert "EVENT" not in views["logs"] and '"loss"' not in views["logs"]

