"""The Python SDK (StudioClient) against a real Studio on the session's Ray cluster.

The Studio serves the tiny model with a LoRA adapter registered beside it; at the end of the
module Serve is shut down so the next module can start it on its own port.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_ray.client import CurrentModel, Job, Model, StudioClient, StudioError, StudioUnavailableError, Upload
from tests.lora import train_adapter
from tests.ray_cluster import free_port

pytestmark = pytest.mark.ray
ADAPTER = "client-adapter"


@pytest.fixture(scope="module")
def client(ray_cluster):
    import ray
    from ray import serve

    from sage_ray.models import resolve_model
    from sage_ray.registry import get_registry
    from sage_ray.serve.deploy import deploy_studio
    from sage_ray.serve.settings import StudioSettings

    base = resolve_model("tiny", progress=False)
    adapter = train_adapter(base, ray_cluster.sage_home / "adapters" / ADAPTER, "Client adapter says zebra.", seed=3)
    ray.get(get_registry(ray_cluster.sage_home).upsert_artifact.remote(
        {"name": ADAPTER, "kind": "lora", "path": str(adapter), "base_model": "tiny"}))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy_studio(StudioSettings(sage_home=str(ray_cluster.sage_home), model="tiny", engine="hf", ui=False),
                      port=port, timeout_s=300)
        with StudioClient(f"http://127.0.0.1:{port}/v1") as studio:  # an OpenAI-style URL is accepted too
            yield studio
    finally:
        serve.shutdown()


def test_models_list_current_and_switch(client):
    models = client.models.list()
    assert all(isinstance(m, Model) for m in models)
    names = {m.name: m for m in models}
    assert names[ADAPTER].kind == "lora" and names[ADAPTER].group == "finetuned"
    assert "tiny-qwen2" in names and names["tiny-qwen2"].active
    current = client.models.current()
    assert isinstance(current, CurrentModel) and current.name == "tiny-qwen2" and current.state == "active"

    assert client.models.switch(ADAPTER) == "switched and active"
    assert client.models.wait_until_active(ADAPTER, timeout=60).kind == "lora"
    assert {m.name for m in client.models.list() if m.active} == {ADAPTER}
    with pytest.raises(StudioError) as err:
        client.models.switch("no-such-model")
    assert err.value.status == 404 and "no model named 'no-such-model'" in err.value.message
    assert client.models.switch("tiny") == "switched and active"
    assert client.models.current().name == "tiny-qwen2"


def test_chat_plain_and_streaming(client):
    whole = client.chat("hello", max_tokens=8, temperature=0)
    assert isinstance(whole, str) and whole
    pieces = list(client.chat([{"role": "user", "content": "hello"}], stream=True, max_tokens=8, temperature=0))
    assert len(pieces) >= 2 and "".join(pieces) == whole  # greedy: the same reply, in pieces
    by_name = client.chat("hello", model=ADAPTER, max_tokens=8, temperature=0)
    assert isinstance(by_name, str) and by_name != whole  # the request's model answered, not the served one
    with pytest.raises(StudioError) as err:
        list(client.chat("hello", model="nope", stream=True))
    assert err.value.status == 404


def test_upload_dataset_and_a_bad_one(client, chat_data, tmp_path):
    upload = client.datasets.upload(chat_data)
    assert isinstance(upload, Upload) and upload.records == 53 and upload.format == "conversations"
    assert upload.filename == "chat.json" and Path(upload.path).is_file()
    assert upload.preview and "<|im_start|>" in upload.preview[0]["rendered"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": 3}\n')
    with pytest.raises(StudioError) as err:
        client.datasets.upload(bad)
    assert err.value.status == 400 and "line 1" in err.value.message and err.value.detail["field"] == "output"


def test_preference_upload_previews_pairs_and_a_job_checks_its_method(client):
    pairs = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart" / "preference.jsonl"
    upload = client.datasets.upload(pairs)
    assert (upload.format, upload.kind, upload.records) == ("preference", "pairs", 16)
    first = upload.preview[0]
    assert first["prompt"].endswith("<|im_start|>assistant\n") and "France" in first["prompt"]
    assert first["chosen"].startswith("The capital of France is Paris.") and "rejected" in first
    with pytest.raises(StudioError) as err:  # pairs trained as SFT: refused before any job exists
        client.jobs.create(data=upload.path, method="sft")
    assert err.value.status == 400 and err.value.detail["field"] == "method" and "--method dpo" in err.value.message
    with pytest.raises(StudioError) as err:  # beta means nothing to sft: never silently dropped
        client.jobs.create(data=upload.path, beta=0.2)
    assert err.value.status == 400 and "beta applies to the preference methods" in err.value.message


def test_jobs_list_and_unknown_task(client):
    assert all(isinstance(job, Job) for job in client.jobs.list())
    for call in (client.jobs.get, client.jobs.cancel, client.jobs.logs, client.jobs.delete):
        with pytest.raises(StudioError) as err:
            call("no_such_task")
        assert err.value.status == 404, call


def create_when_ready(client: StudioClient, cfg) -> Job:
    """jobs.create, retried while Ray's job agent is still starting on a fresh cluster (Ray answers
    "No available agent to submit job, please try again later"; reported to be retried in jobs.py)."""
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            return client.jobs.create(cfg)
        except StudioError as err:
            if "try again later" not in err.message or time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_job_create_wait_logs_delete(client, chat_data):
    from sage_ray import LoraConfig, TrainConfig

    data = client.datasets.upload(chat_data).path
    cfg = TrainConfig(name="client-job", model="tiny", data=data, max_steps=2, batch_size=2, max_length=64,
                      lora=LoraConfig(r=2, alpha=4), cpus_per_worker=1)
    job = create_when_ready(client, cfg)
    assert job.task_id == "client-job" and job.status == "queued"
    seen: list[str] = []
    done = client.jobs.wait(job.task_id, on_progress=lambda j: seen.append(j.status), timeout=240, poll_s=0.5)
    assert done.status == "completed" and done.step == 2, (done.error, client.jobs.logs(job.task_id, tail=50))
    assert seen[-1] == "completed" and len(seen) >= 2
    assert "step 2/2" in client.jobs.logs(job.task_id, tail=500)
    assert any("step 2/2" in line for line in client.jobs.follow_logs(job.task_id))  # ends: the job is over
    assert any(j.task_id == "client-job" for j in client.jobs.list())
    assert client.chat("hi", model="client-job", max_tokens=3, temperature=0) is not None
    client.jobs.delete(job.task_id)
    with pytest.raises(StudioError) as err:
        client.jobs.get(job.task_id)
    assert err.value.status == 404


def test_unreachable_studio_says_how_to_start_it():
    with StudioClient(f"http://127.0.0.1:{free_port()}") as nothing:
        assert not nothing.health()
        with pytest.raises(StudioUnavailableError, match="sage studio start"):
            nothing.models.list()
        with pytest.raises(StudioUnavailableError):
            list(nothing.chat("hi", stream=True))
