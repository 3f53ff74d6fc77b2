"""Evaluation tied to serving, on the tiny model and a real local Ray cluster: eval loss per
eval step while training, a fine-tune compared with its base on held-out records, a gated
switch that refuses a worse model, and rollback."""

from __future__ import annotations

import json
import random

import pytest

from sage_ray import TrainConfig, finetune

_RUNS: dict = {}

# A learnable task: each topic has its own reply, asked in many ways; held-out records ask in
# other words. The tiny model's random lm_head caps what a LoRA on the blocks can change, so
# the test runs adapt lm_head too.
TOPICS = {"cat": "Cats are small animals that purr and sleep a lot.",
          "sea": "The sea is deep, salty and very blue.",
          "bread": "Bread is baked from flour, water and yeast.",
          "train": "A train runs on rails between stations.",
          "moon": "The moon circles the earth once a month."}
ASK = ["Tell me about the {}.", "What do you know about the {}?", "Describe the {} in one line.",
       "Say something about the {}.", "Give me a fact on the {}.", "Explain the {} briefly.",
       "I wonder about the {}.", "Write one sentence on the {}.", "What is a {}?", "Any thoughts on the {}?",
       "Talk about the {}.", "Share a line about the {}.", "Quick note on the {}, please.", "The {}: what is it?"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory):
    """(train file, validation file): 60 and 10 records of the topic task."""
    records = [{"instruction": ask.format(t), "output": reply} for t, reply in TOPICS.items() for ask in ASK]
    random.Random(0).shuffle(records)
    folder = tmp_path_factory.mktemp("topics")
    return write_jsonl(folder / "train.jsonl", records[10:]), write_jsonl(folder / "val.jsonl", records[:10])


def tune(name, model_dir, data, val_data, steps=24, **extra):
    if name not in _RUNS:
        cfg = TrainConfig(name=name, model=str(model_dir), data=str(data), val_data=str(val_data), max_steps=steps,
                          batch_size=4, lr=5e-3, max_length=128, eval_steps=6, save_steps=100, cpus_per_worker=1,
                          lora={"target_modules": TARGETS}, **extra)
        _RUNS[name] = finetune(cfg)
    return _RUNS[name]


def test_eval_loss_is_recorded_per_eval_step_and_falls(ray_cluster, tiny_model_dir, topic_data):
    import ray

    from sage_ray.registry import get_registry

    train, val = topic_data
    result = tune("eval-learned", tiny_model_dir, train, val)
    job = ray.get(get_registry(ray_cluster.sage_home).get_job.remote("eval-learned"))
    evals = job["eval_history"]
    assert [step for step, _loss, _acc in evals] == [6, 12, 18, 24]
    losses = [loss for _step, loss, _acc in evals]
    assert losses[-1] < losses[0] - 0.2 and losses[-1] == min(losses), losses  # it learns what held-out records say
    accuracies = [acc for _s, _l, acc in evals]
    # The first eval can come before the model gets a single held-out token right (CI saw 0.0 at step 6).
    assert all(0.0 <= acc <= 1.0 for acc in accuracies) and accuracies[-1] > accuracies[0], evals

    meta = json.loads(result.paths.meta.read_text())
    assert meta["eval_history"] == evals
    assert meta["metrics"]["eval_loss"] == losses[-1] and meta["metrics"]["best_eval_loss"] == min(losses)
    assert meta["dataset"]["validation_records"] == 10
    log = result.paths.train_log.read_text()
    assert f"validation set: the file {val}" in log and "eval at step 24: eval loss" in log


@pytest.fixture(scope="module")
def studio(ray_cluster, tiny_model_dir):
    """The Studio (API only) serving the tiny model, deployed as `sage studio start` deploys it."""
    import httpx
    from ray import serve

    from sage_ray.serve.deploy import deploy_studio
    from sage_ray.serve.settings import StudioSettings
    from tests.ray_cluster import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = StudioSettings(sage_home=str(ray_cluster.sage_home), model=str(tiny_model_dir), engine="hf", ui=False,
                              allowed_roots=[str(tiny_model_dir.parent)])
    deploy_studio(settings, port=port, app_name="studio", timeout_s=300)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, headers={"x-sage-user": "tester"})
    yield client
    client.close()
    serve.shutdown()


def test_compare_a_finetune_with_its_base_on_held_out_records(ray_cluster, tiny_model_dir, topic_data, studio):
    tune("eval-learned", tiny_model_dir, *topic_data)
    response = studio.post("/api/finetune/tasks/eval-learned/compare", json={"limit": 6})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["candidate"] == "eval-learned" and result["summary"]["examples"] == 6
    validation = [json.loads(line) for line in topic_data[1].read_text().splitlines()]
    for row, record in zip(result["examples"], validation):
        assert row["prompt"][-1]["content"] == record["instruction"] and row["reference"] == record["output"]
        assert isinstance(row["candidate"]["output"], str) and isinstance(row["against"]["output"], str)
    summary = result["summary"]
    assert summary["candidate"]["mean_loss"] < summary["against"]["mean_loss"] - 0.5, summary
    refused = studio.post("/api/finetune/tasks/eval-learned/compare", json={"limt": 3})
    assert refused.status_code == 400 and "limt" in refused.text  # a misspelt field is named, not ignored

    # the SDK streams the comparison's progress (NDJSON) and gets the same result
    from sage_ray.client import StudioClient, StudioError

    progress = []
    with StudioClient(str(studio.base_url)) as sdk:
        streamed = sdk.jobs.compare("eval-learned", limit=2, on_progress=progress.append)
        with pytest.raises(StudioError) as missing:
            sdk.jobs.compare("no-such-task")
    assert [(p["done"], p["total"]) for p in progress] == [(n, 4) for n in range(1, 5)]
    assert [p["model"] for p in progress] == ["eval-learned"] * 2 + [result["against"]] * 2
    assert streamed["examples"] == result["examples"][:2] and missing.value.status == 404


def test_gated_switch_refuses_a_worse_model_and_rollback_restores(ray_cluster, tiny_model_dir, topic_data, studio,
                                                                  chat_data):
    train, val = topic_data
    tune("eval-learned", tiny_model_dir, train, val)
    # the same prompts answered with replies of unrelated records: it learns the wrong replies
    code = json.loads((chat_data.parent / "code.json").read_text())
    records = [json.loads(line) for line in train.read_text().splitlines()]
    wrong = write_jsonl(train.parent / "wrong.jsonl", [{"instruction": r["instruction"], "output": c["output"][:200]}
                                                      for r, c in zip(records, code)])
    wrong_run = tune("eval-wrong", tiny_model_dir, wrong, val, keep="best")
    # keep 'best': the adapter of its lowest eval loss is the one exported, and the log says so
    kept, metrics = wrong_run.meta["kept"], wrong_run.meta["metrics"]
    assert kept == {"keep": "best", "step": metrics["best_eval_step"], "eval_loss": metrics["best_eval_loss"]}
    assert f"keep best: the adapter of step {kept['step']}" in wrong_run.paths.train_log.read_text()

    assert studio.post("/api/finetune/switch-model", json={"model_path": "eval-learned"}).status_code == 200
    refused = studio.post("/api/finetune/switch-model", json={"model_path": "eval-wrong", "require_better": True})
    assert refused.status_code == 409, refused.text
    figures = refused.json()["error"]["comparison"]
    assert figures["candidate"]["mean_loss"] > figures["against"]["mean_loss"] and figures["models"]["against"] == "eval-learned"
    assert studio.get("/api/finetune/current-model").json()["name"] == "eval-learned"  # the old model keeps serving
    reply = studio.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["model"] == "eval-learned"

    from sage_ray.client import StudioClient

    with StudioClient(str(studio.base_url), timeout=600) as sdk:
        rolled = sdk.models.rollback()
        history = sdk.models.switches(limit=5)
    assert rolled["rolled_back_from"] == "eval-learned"
    assert history[0]["action"] == "rollback" and history[1]["figures"] is None
    current = studio.get("/api/finetune/current-model").json()
    assert current["path"] == str(tiny_model_dir) and current["state"] == "active"
    latest, switched = studio.get("/api/finetune/switches").json()[:2]
    # the SDK gave no x-sage-user name: its address stands for who; the switch before was "tester"'s
    assert latest["action"] == "rollback" and latest["from_model"] == "eval-learned" and latest["who"] == "127.0.0.1"
    assert switched["action"] == "switch" and switched["to_model"] == "eval-learned" and switched["who"] == "tester"

    # a gated switch that passes: the fine-tune beats the base now served, and the figures are kept
    passed = studio.post("/api/finetune/switch-model", json={"model_path": "eval-learned", "require_better": True})
    assert passed.status_code == 200, passed.text
    assert passed.json()["comparison"]["candidate"]["mean_loss"] < passed.json()["comparison"]["against"]["mean_loss"]
    gated = studio.get("/api/finetune/switches", params={"limit": 1}).json()[0]
    assert gated["to_model"] == "eval-learned" and gated["figures"] == passed.json()["comparison"]


def test_a_canary_answers_its_share_and_a_plain_switch_ends_it(ray_cluster, tiny_model_dir, topic_data, studio):
    tune("eval-learned", tiny_model_dir, *topic_data)
    body = {"model_path": str(tiny_model_dir), "canary": "eval-learned", "weight": 0.5}
    answer = studio.post("/api/finetune/switch-model", json=body)
    assert answer.status_code == 200, answer.text
    assert studio.get("/api/finetune/current-model").json()["canary"] == {"name": "eval-learned", "weight": 0.5}
    listed = {m["id"]: m for m in studio.get("/v1/models").json()["data"]}
    assert listed["eval-learned"]["canary_weight"] == 0.5
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    served = [studio.post("/v1/chat/completions", json=hi).json()["model"] for _ in range(40)]
    assert 5 <= served.count("eval-learned") <= 35 and len(set(served)) == 2, served  # both answer, by weight
    named = {studio.post("/v1/chat/completions", json={**hi, "model": "eval-learned"}).json()["model"]
             for _ in range(5)}
    assert named == {"eval-learned"}
    for bad, field in (({**body, "weight": 1.5}, "weight"), ({"model_path": "eval-learned", "weight": 0.2}, "canary")):
        refused = studio.post("/api/finetune/switch-model", json=bad)
        assert refused.status_code == 400 and field in refused.json()["error"]["message"], refused.text
    assert studio.get("/api/finetune/current-model").json()["canary"]["name"] == "eval-learned"  # refused: unchanged
    assert studio.post("/api/finetune/switch-model", json={"model_path": "eval-learned"}).status_code == 200
    assert studio.get("/api/finetune/current-model").json()["canary"] is None
