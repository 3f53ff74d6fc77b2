"""Validation sets, eval metrics and their records: the pure parts, without Ray."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sage_ray.config import ConfigError, TrainConfig, parse_train_config
from sage_ray.data.split import auto_fraction, held_out_count, resolve_validation, split_records
from sage_ray.registry.store import RegistryStore
from sage_ray.train.evaluation import eval_event, final_eval, token_accuracy
from sage_ray.ui.format import loss_frame


def test_auto_fraction_holds_out_a_tenth_of_large_enough_datasets_only():
    assert auto_fraction(49) == 0.0
    assert auto_fraction(50) == 0.1
    assert auto_fraction(10_000) == 0.02  # capped at 200 records
    assert held_out_count(50, 0.1) == 5 and held_out_count(3, 0.01) == 1 and held_out_count(2, 0.9) == 1


def test_split_is_deterministic_disjoint_and_keeps_order():
    records = list(range(100))
    train, val = split_records(records, 0.1, seed=7)
    assert (train, val) == split_records(records, 0.1, seed=7)
    assert len(val) == 10 and sorted(train + val) == records and not set(train) & set(val)
    assert val == sorted(val) and train == sorted(train)
    assert split_records(records, 0.1, seed=8)[1] != val
    assert split_records(records, 0.0, seed=7) == (records, [])


def test_resolve_validation_says_what_it_chose():
    cfg, note = resolve_validation(TrainConfig(data="x.json"), 53)
    assert cfg.validation_split == 0.1 and "5 of 53 records held out" in note and "automatic" in note
    cfg, note = resolve_validation(TrainConfig(data="x.json"), 20)
    assert cfg.validation_split == 0.0 and "none" in note
    cfg, note = resolve_validation(TrainConfig(data="x.json", val_data="v.json"), 20)
    assert cfg.validation_split == 0.0 and "v.json" in note
    cfg, _ = resolve_validation(TrainConfig(data="x.json", method="dpo"), 500)
    assert cfg.validation_split == 0.0  # preference runs train without one


def test_eval_steps_without_a_validation_set_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="eval_steps"):
        resolve_validation(TrainConfig(data="x.json", eval_steps=5), 20)


def test_conflicting_or_unsupported_validation_options_are_refused():
    with pytest.raises(ConfigError, match="val_data and validation_split"):
        parse_train_config({"data": "x", "val_data": "v", "validation_split": 0.2})
    with pytest.raises(ConfigError, match="method sft only"):
        parse_train_config({"data": "x", "method": "dpo", "validation_split": 0.2})
    with pytest.raises(ConfigError, match="validation_split"):
        parse_train_config({"data": "x", "validation_split": 1.0})


def test_token_accuracy_scores_next_token_guesses_on_labelled_positions_only():
    # position t predicts token t+1; -100 labels (prompt, padding, sequence starts) are not scored
    labels = np.array([[-100, 5, 6, 7, -100, -100]])
    predicted = np.array([[5, 6, 0, 9, 9, 9]])  # right for 5 and 6, wrong for 7
    result = token_accuracy(SimpleNamespace(predictions=predicted, label_ids=labels))
    assert result == {"token_accuracy": pytest.approx(2 / 3)}


def test_eval_event_and_final_figures():
    assert eval_event({"loss": 1.0}, 3) is None
    assert eval_event({"eval_loss": 1.23456, "eval_token_accuracy": 0.5}, 3) == {
        "event": "eval", "step": 3, "eval_loss": 1.2346, "eval_token_accuracy": 0.5}
    assert final_eval([[5, 2.0, 0.1], [10, 1.5, 0.2], [15, 1.7, 0.25]]) == {
        "eval_loss": 1.7, "eval_token_accuracy": 0.25, "best_eval_loss": 1.5, "best_eval_step": 10}


def test_store_records_eval_points_beside_the_train_loss(tmp_path):
    store = RegistryStore(tmp_path / "registry.db")
    store.create_job("t1")
    store.report_progress("t1", {"event": "progress", "step": 5, "loss": 2.0})
    assert store.report_progress("t1", {"event": "eval", "step": 5, "eval_loss": 1.9, "eval_token_accuracy": 0.3})
    assert not store.report_progress("t1", {"event": "eval", "step": 5, "eval_loss": 1.9})  # repeated: ignored
    store.report_progress("t1", {"event": "progress", "step": 10, "loss": 1.5})
    assert store.report_progress("t1", {"event": "eval", "step": 10, "eval_loss": 1.6})
    job = store.get_job("t1")
    assert job["eval_history"] == [[5, 1.9, 0.3], [10, 1.6, None]]
    assert job["loss_history"] == [[5, 2.0], [10, 1.5]] and job["step"] == 10
    assert store.rewind_progress("t1", 7)["eval_history"] == [[5, 1.9, 0.3]]
    with pytest.raises(Exception, match="eval_loss"):
        store.report_progress("t1", {"event": "eval", "step": 12, "eval_loss": None})


def test_store_keeps_every_switch_newest_first(tmp_path):
    store = RegistryStore(tmp_path / "registry.db")
    store.record_switch("switch", "ft-1", from_model="tiny", who="alice", figures={"candidate_loss": 1.0})
    store.record_switch("rollback", "tiny", from_model="ft-1", who="bob")
    latest, first = store.list_switches()
    assert latest["action"] == "rollback" and latest["to_model"] == "tiny" and latest["who"] == "bob"
    assert first["figures"] == {"candidate_loss": 1.0} and first["from_model"] == "tiny"
    assert latest["at"] > first["at"]
    with pytest.raises(Exception, match="action"):
        store.record_switch("promote", "x")


def test_loss_frame_draws_smoothed_train_loss_and_eval_loss():
    job = {"loss_history": [[1, 3.0], [2, 2.0], [3, 2.5], [4, 1.0]], "eval_history": [[2, 2.2, 0.1], [4, 1.4, 0.3]]}
    frame = loss_frame(job)
    series = {name: list(group["value"]) for name, group in frame.groupby("series")}
    assert series["loss"] == [3.0, 2.0, 2.5, 1.0]
    assert series["eval loss"] == [2.2, 1.4]
    smoothed = series["loss (smoothed)"]
    assert smoothed[0] == pytest.approx(3.0) and min(series["loss"]) < smoothed[-1] < max(series["loss"])


def test_compare_takes_the_last_reply_as_reference_and_sums_up_per_model(tmp_path):
    import json

    from sage_ray.comparison import CompareError, cases, held_out_examples, is_better, summarise
    from sage_ray.data import load_dataset

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(60)))
    examples = load_dataset(data).examples
    pairs = cases(examples, limit=3)
    assert pairs[0] == ([{"role": "user", "content": "q0"}], "a0") and len(pairs) == 3
    meta = {"task_id": "t", "config": {"data": str(data), "validation_split": 0.1, "seed": 42}}
    held = held_out_examples(meta)
    assert held == split_records(examples, 0.1, 42)[1] and len(held) == 6  # what training held out
    with pytest.raises(CompareError, match="held nothing out"):
        held_out_examples({"task_id": "t", "config": {"data": str(data), "validation_split": 0.0}})
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(CompareError, match="final assistant reply"):
        cases(load_dataset(text).examples, limit=3)

    score = lambda loss, tokens, hit: {"loss": loss, "tokens": tokens, "exact_match": hit,  # noqa: E731
                                       "contains_reference": hit}
    rows = [{"candidate": score(1.0, 10, True), "against": score(2.0, 10, False)},
            {"candidate": score(3.0, 30, False), "against": score(2.0, 30, False)}]
    assert summarise(rows, "candidate") == {"mean_loss": 2.5, "exact_match": 0.5, "contains_reference": 0.5}
    assert summarise(rows, "against")["mean_loss"] == 2.0
    result = {"summary": {"candidate": summarise(rows, "candidate"), "against": summarise(rows, "against")}}
    assert not is_better(result)


def test_evaluation_runs_with_one_worker_only():
    import pytest as _pytest

    from sage_ray.config import ConfigError, TrainConfig
    from sage_ray.data.split import resolve_validation

    cfg, said = resolve_validation(TrainConfig(data="d.json", num_workers=2), records=500)
    assert cfg.validation_split == 0.0 and "one worker" in said  # automatic split off: no hang in evaluation
    with _pytest.raises(ConfigError, match="field 'validation_split'.*not implemented"):
        resolve_validation(TrainConfig(data="d.json", num_workers=2, validation_split=0.1), records=500)


def test_comparison_reports_progress_per_answer_then_the_result(tmp_path, tiny_model_dir):
    import json

    from sage_ray.comparison import compare_on_node

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n" for w in ("a", "b", "c")))
    spec = {"name": "tiny", "path": str(tiny_model_dir), "kind": "base", "base_path": None}
    events = list(compare_on_node(spec, {**spec, "name": "other"}, {"prompts": str(prompts)}, limit=2,
                                  max_length=64, max_new_tokens=3))
    progress = [event["progress"] for event in events[:-1]]
    assert progress == [{"done": n, "total": 4, "model": model} for n, model in
                        ((1, "tiny"), (2, "tiny"), (3, "other"), (4, "other"))]
    result = events[-1]["result"]
    assert [row["reference"] for row in result["examples"]] == ["a", "b"]
    # the same model on both sides scores the same: the figures come from the models, not a constant
    assert result["summary"]["candidate"] == result["summary"]["against"] and result["summary"]["examples"] == 2
    missing = list(compare_on_node(spec, spec, {"prompts": str(tmp_path / "none.jsonl")}, 2, 64, 3))
    assert len(missing) == 1 and "none.jsonl" in missing[0]["error"]


def test_keep_best_exports_the_weights_of_the_lowest_eval_loss(tiny_model_dir):
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from sage_ray.train.callbacks import KeepBest

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    keeper = KeepBest(model)
    assert keeper.restore() is None  # nothing evaluated: nothing to put back
    seen = {}
    for step, loss in ((2, 2.0), (4, 1.0), (6, 1.5), (8, None)):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(float(step))  # each step's weights are told apart by their value
        seen[step] = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        keeper.on_evaluate(None, SimpleNamespace(global_step=step), None, metrics={"eval_loss": loss} if loss else {})
    assert keeper.restore() == {"keep": "best", "step": 4, "eval_loss": 1.0}
    restored = get_peft_model_state_dict(model)
    assert all(torch.equal(restored[k], seen[4][k]) for k in restored) and any("lora_B" in k for k in restored)


def test_keep_best_without_a_validation_set_is_refused_naming_keep():
    from sage_ray.config import ConfigError, TrainConfig
    from sage_ray.data.split import resolve_validation

    with pytest.raises(ConfigError, match="field 'keep'"):
        resolve_validation(TrainConfig(data="d.json", keep="best"), records=10)  # too few for a split
    with pytest.raises(ConfigError, match="field 'keep'"):
        resolve_validation(TrainConfig(data="d.json", keep="best", num_workers=2), records=500)
    with pytest.raises(ValueError, match="keep"):
        TrainConfig(data="d.json", keep="best", method="dpo")
    cfg, _ = resolve_validation(TrainConfig(data="d.json", keep="best"), records=500)
    assert cfg.validation_split > 0 and cfg.keep == "best"
