"""The Studio's compare panel, gated switch and rollback, on plain records and a fake Promotion:
no browser, no Ray."""

from __future__ import annotations

import pytest

from sage_ray.ui import compare_panel, finetune_tab, model_switch
from tests.unit.test_ui import BASE, CURRENT, LORA, MERGED, RecordingService, ServiceError, job

SUMMARY = {"examples": 2, "candidate": {"mean_loss": 1.1311, "exact_match": 0.5, "contains_reference": 0.5},
           "against": {"mean_loss": 2.2727, "exact_match": 0.0, "contains_reference": 0.5}}
RESULT = {"candidate": MERGED["name"], "against": BASE["name"], "summary": SUMMARY, "examples": [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Breakfast <idea>?"}],
     "reference": "Overnight oats.",
     "candidate": {"output": "Oats & milk.", "loss": 1.2, "tokens": 5, "exact_match": False,
                   "contains_reference": False},
     "against": {"output": "Eggs.", "loss": 2.5, "tokens": 5, "exact_match": False, "contains_reference": False}},
    {"prompt": [{"role": "user", "content": "2+2?"}], "reference": "4",
     "candidate": {"output": "4", "loss": 0.1, "tokens": 2, "exact_match": True, "contains_reference": True},
     "against": {"output": "It is 4.", "loss": 0.05, "tokens": 2, "exact_match": False, "contains_reference": True}}]}


class FakePromotion:
    """Promotion's calls on a RecordingService: compare answers RESULT in 4 progress events."""

    def __init__(self, service, fail_midway=None):
        self.service, self.fail_midway, self.calls = service, fail_midway, []

    def compare_events(self, task_id, against=None, prompts=None, limit=32):
        self.calls.append(("compare", task_id, against, limit))
        if task_id not in self.service.jobs:  # checked up front, as Promotion does
            raise ServiceError(404, f"task {task_id!r} has no completed model")
        if limit > 1000:
            raise ServiceError(400, f"field 'limit': {limit} must be from 1 to 1000")

        def events():
            for done in (1, 2, 3, 4):
                if self.fail_midway and done == 3:
                    raise self.fail_midway
                yield {"progress": {"done": done, "total": 4, "model": RESULT["candidate" if done <= 2 else "against"]}}
            yield {"result": RESULT}
        return events()

    def switch(self, ref, *, require_better=False, who=None):
        self.calls.append(("switch", ref, require_better, who))
        if ref == "worse":
            raise ServiceError(409, f"not switched: {ref!r} has held-out loss 2.5 against 1.2 for the served "
                                    "'tiny' (2 examples); it must be lower", {"comparison": SUMMARY})
        return {**self.service.switch_model(ref, who=who, figures=SUMMARY), "comparison": SUMMARY}

    def rollback(self, who=None):
        latest = self.history(1)
        if not latest:
            raise ServiceError(409, "nothing to roll back to: no switch of the served model is recorded")
        answer = self.service.switch_model(latest[0]["from_model"], who=who, action="rollback")
        return {**answer, "rolled_back_from": latest[0]["to_model"]}

    def history(self, limit=50):
        return self.service.switches[:limit]


def test_compare_choices_are_completed_tasks_with_a_model_newest_first():
    jobs = [job(MERGED["task_id"], "completed", "2026-11-29T10:15:00"), job(LORA["task_id"], "completed",
            "2026-11-30T09:00:00"), job("running", "training", "2026-11-30T11:00:00"),
            job("no-model", "completed", "2026-11-30T12:00:00")]
    assert compare_panel.task_choices(jobs, [BASE, MERGED, LORA]) == [
        ("qa_20261130_090000 (LoRA)", "qa_20261130_090000"), ("chat_20261129_101500 (merged)", "chat_20261129_101500")]
    merged_too = {**LORA, "name": "qa-merged", "kind": "merged"}
    assert compare_panel.task_choices(jobs, [LORA, merged_too])[0][0] == "qa_20261130_090000 (merged)"
    against = compare_panel.against_choices([BASE, MERGED], CURRENT)
    assert against[0] == ("the served model (SmolLM2-135M-Instruct)", compare_panel.SERVED)
    assert [v for _, v in against[1:]] == [BASE["name"], MERGED["name"]]


def test_the_compared_task_is_the_one_selected_in_the_table_else_the_newest():
    jobs = [job(MERGED["task_id"], "completed", "2026-11-29T10:15:00"),
            job(LORA["task_id"], "completed", "2026-11-30T09:00:00"), job("run", "training", "2026-11-30T11:00:00")]
    views = compare_panel.choice_views(jobs, [BASE, MERGED, LORA], CURRENT, MERGED["task_id"])
    assert views["body"]["visible"] is True and views["empty"]["visible"] is False
    assert views["task"]["value"] == MERGED["task_id"] and len(views["task"]["choices"]) == 2
    assert compare_panel.choice_views(jobs, [BASE, MERGED, LORA], CURRENT, "run")["task"]["value"] == LORA["task_id"]
    # Against gets its choices only: the page keeps the user's pick ("the served model" at first)
    assert "value" not in views["against"] and views["against"]["choices"][0][1] == compare_panel.SERVED
    empty = compare_panel.choice_views([], [BASE], CURRENT)
    assert empty["body"]["visible"] is False and empty["empty"]["visible"] is True
    assert all(finetune_tab.is_skip(v) for v in compare_panel.choice_views(None, [BASE], CURRENT).values())


def test_the_page_refresh_carries_the_compare_choices_and_sends_them_once():
    service = RecordingService([job(LORA["task_id"], "completed", "2026-11-30T09:00:00")])
    keys = finetune_tab.VIEW_KEYS
    first = finetune_tab.refresh(service, None, 200, {})
    assert first[keys.index("eval_task")]["value"] == LORA["task_id"]
    assert first[keys.index("eval_body")]["visible"] is True
    second = finetune_tab.refresh(service, first[-2], 200, first[-1])
    assert all(finetune_tab.is_skip(second[keys.index(f"eval_{k}")]) for k in compare_panel.CHOICE_KEYS)


def test_progress_line_names_the_model_answering_and_how_far():
    line = compare_panel.progress_html({"done": 5, "total": 12, "model": "eval-learned"})
    assert "answering: <b>eval-learned</b> 5/12" in line and 'style="width:42%"' in line
    assert "loading both models" in compare_panel.progress_html(None)


def test_summary_says_which_is_better_with_each_models_figures():
    html = compare_panel.summary_html(RESULT)
    assert ("✓ chat_20261129_101500 is better than SmolLM2-135M-Instruct: "
            "held-out loss 1.1311 vs 2.2727 on 2 prompts") in html
    assert "sr-ok" in html and '<td class="sr-better">1.1311</td>' in html and "<td>50%</td>" in html
    worse = {**RESULT, "summary": {**SUMMARY, "candidate": SUMMARY["against"], "against": SUMMARY["candidate"]}}
    kind, sentence = compare_panel.verdict(worse)
    assert kind == "warn" and sentence.startswith("✗ chat_20261129_101500 is not better")
    assert '<td class="sr-better">1.1311</td>' in compare_panel.summary_html(worse)  # the against side's
    unscored = {**RESULT, "summary": {**SUMMARY, "candidate": {**SUMMARY["candidate"], "mean_loss": None}}}
    assert compare_panel.verdict(unscored)[0] == "idle"


def test_examples_table_puts_both_answers_side_by_side_escaped():
    html = compare_panel.examples_html(RESULT)
    assert html.count("<tr>") == 3  # header + 2 prompts
    assert "Breakfast &lt;idea&gt;?" in html and "+1 earlier turn" in html and "Oats &amp; milk." in html
    assert "Be brief." not in html  # the system turn is counted, not shown
    assert '<td class="sr-num sr-better">1.2000</td>' in html and '<td class="sr-num sr-better">0.0500</td>' in html
    assert "exact match</span>" in html and "contains the reference</span>" in html


def test_run_compare_streams_progress_then_the_summary_and_rows():
    service = RecordingService([job(MERGED["task_id"], "completed", "2026-11-29T10:15:00")])
    promotion = FakePromotion(service)
    steps = list(compare_panel.run_compare(promotion, MERGED["task_id"], compare_panel.SERVED, 8))
    assert steps[0]["run"]["interactive"] is False and "loading both models" in steps[0]["progress"]
    assert [s["progress"].split("</b> ")[1][:3] for s in steps[1:5]] == ["1/4", "2/4", "3/4", "4/4"]
    final = steps[-1]
    assert final["run"]["interactive"] is True and final["result_box"]["visible"] is True
    assert final["candidate"] == MERGED["task_id"] and "is better than" in final["summary"]
    assert final["table"].count("<tr>") == 3
    assert promotion.calls == [("compare", MERGED["task_id"], None, 8)]  # "the served model" is the default
    list(compare_panel.run_compare(promotion, MERGED["task_id"], LORA["name"], ""))
    assert promotion.calls[-1] == ("compare", MERGED["task_id"], LORA["name"], 32)


@pytest.mark.parametrize("task, limit, fail, message", [
    ("unknown", 8, None, "compare unknown: task &#x27;unknown&#x27; has no completed model"),
    ("done", 5000, None, "field &#x27;limit&#x27;: 5000 must be from 1 to 1000"),
    ("done", 8, ServiceError(400, "task 'done' held nothing out"), "held nothing out"),
    ("done", 8, RuntimeError("ray died"), "Unexpected error (RuntimeError): ray died"),
])
def test_run_compare_shows_errors_readably_and_leaves_the_button_usable(task, limit, fail, message):
    promotion = FakePromotion(RecordingService([job("done", "completed", "2026-11-30T09:00:00")]), fail)
    final = list(compare_panel.run_compare(promotion, task, None, limit))[-1]
    assert "sr-error" in final["progress"] and message in final["progress"], final["progress"]
    assert "Traceback" not in final["progress"]
    assert final["run"]["interactive"] is True and final["result_box"]["visible"] is False
    assert final["candidate"] is None  # nothing to serve
    assert "Pick a completed fine-tune" in list(compare_panel.run_compare(promotion, None, None, 8))[-1]["progress"]


def test_serve_if_better_switches_or_shows_the_refusal_with_its_figures():
    service = RecordingService()
    promotion = FakePromotion(service)
    steps = list(compare_panel.promote(promotion, MERGED["task_id"], "127.0.0.1 (web UI)"))
    assert "Comparing chat_20261129_101500 with the served model" in steps[0]
    assert "sr-ok" in steps[-1] and "chat_20261129_101500: switched" in steps[-1]
    assert "(held-out loss 1.1311 vs 2.2727 on 2 prompts)" in steps[-1]
    assert promotion.calls[-1] == ("switch", MERGED["task_id"], True, "127.0.0.1 (web UI)")
    refused = list(compare_panel.promote(promotion, "worse", None))[-1]
    assert "sr-warn" in refused and "not switched" in refused and "held-out loss 2.5 against 1.2" in refused
    unknown = compare_panel.refusal_html(ServiceError(400, "require_better: 'x' is not a fine-tune task's model"))
    assert "sr-error" in unknown and "is not a fine-tune" in unknown
    assert "Compare a fine-tune first" in list(compare_panel.promote(promotion, None, None))[-1]


def test_rollback_says_where_it_went_and_the_history_lists_the_switches():
    service = RecordingService()
    promotion = FakePromotion(service)
    nothing = model_switch.rollback(service, promotion, "me")
    assert "sr-error" in nothing["status"] and "nothing to roll back to" in nothing["status"]
    views = model_switch.history_views(promotion)
    assert views["rollback"]["interactive"] is False and "No switches recorded yet" in views["history"]
    model_switch.switch(service, MERGED["name"], who="127.0.0.1 (web UI)")
    assert model_switch.history_views(promotion)["rollback"]["interactive"] is True
    out = model_switch.rollback(service, promotion, "me")
    assert "Rolled back from chat_20261129_101500 to SmolLM2-135M-Instruct" in out["status"]
    assert out["dropdown"]["value"] == BASE["name"] and BASE["name"] in out["card"]
    history = model_switch.history_views(promotion)["history"]
    assert history.index("rollback</span>") < history.index("switch</span>")  # newest first
    assert "2026-12-01 10:01" in history and "chat_20261129_101500 → <b>SmolLM2-135M-Instruct</b>" in history
    assert "127.0.0.1 (web UI)" in history and "· me" in history
    gated = model_switch.switch_line({"at": "2026-12-01T10:00:00", "action": "switch", "from_model": None,
                                      "to_model": "/h/studio_finetune/t/merged_model", "who": None,
                                      "figures": SUMMARY})
    assert "the default → <b>merged_model</b>" in gated and "held-out loss 1.1311 vs 2.2727" in gated


def test_who_names_the_pages_user_or_address():
    from types import SimpleNamespace

    assert model_switch.who_of(SimpleNamespace(username="sage", client=None)) == "sage (web UI)"
    assert model_switch.who_of(SimpleNamespace(username=None, client=SimpleNamespace(host="10.0.0.2"))) == \
        "10.0.0.2 (web UI)"
    assert model_switch.who_of(None) == "unknown (web UI)"
