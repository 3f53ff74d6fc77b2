"""The Studio on a real local Ray cluster: OpenAI API, hot swap by reconfigure, Studio routes.

The app is config-deployed the way `serve run configs/studio.yaml` and `sage studio start`
deploy it, with the tiny model and two LoRA adapters trained here for a few steps.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.lora import train_adapter
from tests.ray_cluster import free_port

pytestmark = pytest.mark.ray
APP = "studio"


@pytest.fixture(scope="module")
def studio(ray_cluster):
    """The Studio config-deployed on the session cluster, with adapters a and b and a merged model."""
    import ray
    from ray import serve

    from sage_ray.models import resolve_model
    from sage_ray.registry import get_registry
    from sage_ray.serve.deploy import deploy_studio
    from sage_ray.serve.settings import StudioSettings
    from sage_ray.train.merge import merge_adapter

    home = ray_cluster.sage_home
    base = resolve_model("tiny", progress=False)
    adapters = home / "adapters"
    a = train_adapter(base, adapters / "adapter-a", "The answer is always forty two.", 1)
    b = train_adapter(base, adapters / "adapter-b", "Bonjour bonjour bonjour le monde.", 2)
    merged = home / "merged" / "merged-a"
    merge_adapter(a, base, merged)
    registry = get_registry(home)
    for name, kind, path in (("adapter-a", "lora", a), ("adapter-b", "lora", b), ("merged-a", "merged", merged)):
        ray.get(registry.upsert_artifact.remote({"name": name, "kind": kind, "path": str(path), "base_model": "tiny"}))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = StudioSettings(sage_home=str(home), model="tiny", engine="hf", ui=False)
    deploy_studio(settings, port=port, app_name=APP, timeout_s=300)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    yield {"client": client, "port": port, "settings": settings, "paths": {"a": a, "b": b, "merged": merged},
           "base": base}
    client.close()
    serve.shutdown()


def chat(client: httpx.Client, model: str | None = None, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0, **extra}
    if model:
        body["model"] = model
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def switch(client: httpx.Client, ref: str, *, as_body: bool = False) -> httpx.Response:
    if as_body:
        return client.post("/api/finetune/switch-model", json={"model_path": ref})
    return client.post("/api/finetune/switch-model", params={"model_path": ref})


def llm_status(client: httpx.Client) -> dict:
    return client.get("/api/finetune/current-model").json()


def test_openai_client_lists_models_and_streams(studio):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{studio['port']}/v1", api_key="unused")
    ids = {m.id for m in client.models.list().data}
    assert {"adapter-a", "adapter-b", "merged-a", "tiny-qwen2"} <= ids
    stream = client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    whole = client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0)
    assert len(pieces) >= 3 and "".join(pieces)
    assert whole.choices[0].message.content and whole.usage.completion_tokens > 0


def test_adapter_switch_keeps_the_base_loaded(studio):
    client = studio["client"]
    base_reply = chat(client)["choices"][0]["message"]["content"]
    response = switch(client, "adapter-a")
    assert response.status_code == 200, response.text
    assert response.json()["message"] == "switched and active"
    before = client.get("/api/finetune/current-model").json()
    reply_a = chat(client)
    assert reply_a["model"] == "adapter-a"
    response = switch(client, "adapter-b", as_body=True)
    assert response.status_code == 200, response.text
    reply_b = chat(client)
    assert reply_b["model"] == "adapter-b"
    assert len({base_reply, reply_a["choices"][0]["message"]["content"], reply_b["choices"][0]["message"]["content"]}) == 3
    status = _llm_details()
    assert status["loaded_bases"] == [str(studio["base"])]  # one base, never reloaded
    stats = status["stats"][str(studio["base"])]
    assert stats["base_loads"] == 1, stats
    assert before["state"] == "active"


def _declared_in_config(details: dict) -> str | None:
    config = details["applications"][APP].get("deployed_app_config") or {}
    llm = next(d for d in config["deployments"] if d["name"] == "LLMServer")
    return llm["user_config"]["model"]


def _llm_details() -> dict:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=APP).status.remote().result(timeout_s=30)


def test_swap_to_merged_and_back_under_streaming_load(studio):
    client = studio["client"]
    url = f"http://127.0.0.1:{studio['port']}/v1/chat/completions"
    stop, results, errors = threading.Event(), [], []

    def stream_forever():
        with httpx.Client(timeout=120) as own:
            while not stop.is_set():
                body = {"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 12, "stream": True}
                try:
                    with own.stream("POST", url, json=body) as response:
                        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
                    assert response.status_code == 200 and lines[-1] == "data: [DONE]", (response.status_code, lines[-2:])
                    results.append(json.loads(lines[1][6:])["model"])
                except Exception as err:  # counted, and the test fails on any
                    errors.append(repr(err))

    workers = [threading.Thread(target=stream_forever) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.0)
        for ref in ("merged-a", "tiny-qwen2", "merged-a", "adapter-a"):
            response = switch(client, ref)
            assert response.status_code == 200, response.text
            time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    assert errors == []
    assert len(results) >= 8 and {"merged-a", "tiny-qwen2"} <= set(results)


def test_broken_model_keeps_the_old_one_serving(studio, ray_cluster):
    client = studio["client"]
    assert switch(client, "adapter-b").status_code == 200
    broken = ray_cluster.sage_home / "broken-model"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text('{"model_type": "qwen2", "not": "a real config"}')
    response = switch(client, str(broken))
    assert response.status_code == 422, response.text
    assert "broken-model" in response.json()["error"]["message"]
    current = llm_status(client)
    assert current["name"] == "adapter-b" and current["state"] == "active"
    assert "broken-model" in current["error"]
    assert chat(client)["model"] == "adapter-b"
    assert switch(client, "adapter-a").status_code == 200


def test_studio_routes_and_their_errors(studio, chat_data):
    client = studio["client"]
    models = client.get("/api/finetune/models").json()
    assert {m["group"] for m in models} == {"base", "finetuned"}
    assert client.get("/api/finetune/tasks").status_code == 200
    assert client.get("/api/finetune/tasks/no_such_task").status_code == 404
    assert client.get("/api/finetune/tasks/..%2F..%2Fetc").status_code in (400, 404)
    assert client.post("/api/finetune/tasks/no_such_task/cancel").status_code == 404
    assert client.delete("/api/finetune/tasks/no_such_task").status_code == 404
    assert client.get("/api/finetune/tasks/no_such_task/logs").status_code == 404
    assert switch(client, "/etc").status_code == 403
    assert switch(client, str(studio["paths"]["a"]) + "/../../../../etc").status_code == 400
    assert client.post("/api/finetune/switch-model").status_code == 400
    ok = client.post("/api/finetune/upload-dataset",
                     files={"file": ("../../evil name.json", chat_data.read_bytes(), "application/json")})
    assert ok.status_code == 200, ok.text
    uploaded = ok.json()
    assert Path(uploaded["path"]).parent == studio["settings"].roots()[0] / "datasets"
    assert uploaded["filename"] == "evil_name.json" and uploaded["records"] > 10
    assert "<|im_start|>" in uploaded["preview"][0]["rendered"]
    bad = client.post("/api/finetune/upload-dataset",
                      files={"file": ("bad.jsonl", b'{"instruction": "hi", "output": 3}\n', "application/json")})
    assert bad.status_code == 400 and "line 1" in bad.json()["error"]["message"]
    assert bad.json()["error"]["field"] == "output"
    wrong_type = client.post("/api/finetune/upload-dataset", files={"file": ("x.exe", b"MZ", "application/octet-stream")})
    assert wrong_type.status_code == 400
    plan = client.post("/api/finetune/plan", json={"model": "tiny", "data": uploaded["path"], "epochs": 1})
    assert plan.status_code == 200, plan.text
    assert plan.json()["config"]["preset"] == "cpu" and plan.json()["memory"]["total_gib"] > 0
    outside = client.post("/api/finetune/plan", json={"model": "tiny", "data": "/etc/passwd"})
    assert outside.status_code == 403
    assert client.post("/api/finetune/plan", json={"model": "tiny", "epochs": "many"}).status_code == 400
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    assert client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}).status_code == 404


def test_killed_replica_comes_back_with_the_declared_model(studio):
    from sage_ray.serve.deploy import serve_details

    client = studio["client"]
    assert switch(client, "adapter-b").status_code == 200
    deadline = time.monotonic() + 60  # the switch is in force at once; its config deploy follows it
    while _declared_in_config(serve_details()) != "adapter-b":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    pid = _llm_details()["pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                              "max_tokens": 3})
            if reply.status_code == 200 and _llm_details().get("swaps") == 1:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert reply.status_code == 200 and reply.json()["model"] == "adapter-b"
    assert _llm_details()["active"]["name"] == "adapter-b" and _llm_details()["pid"] != pid


def test_api_key_protects_the_api(ray_cluster):
    from fastapi.testclient import TestClient

    from sage_ray.serve.ingress import build_asgi_app
    from sage_ray.serve.service import StudioService
    from sage_ray.serve.settings import StudioSettings

    settings = StudioSettings(sage_home=str(ray_cluster.sage_home), model="tiny", ui=False, api_key="s3cret")
    assert "s3cret" not in settings.model_dump_json()  # the Serve config (on the dashboard) holds only a hash
    with TestClient(build_asgi_app(StudioService(settings)), base_url="http://127.0.0.1") as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/api/finetune/tasks", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/chat/completions", json={}).status_code == 401
        assert client.get("/api/health").status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
