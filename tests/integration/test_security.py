"""Hostile requests against a real Studio on the session's Ray cluster: each gets its 4xx, the
Studio keeps serving, and nothing is written (no job, no file, no download, no switch)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.ray_cluster import free_port

pytestmark = pytest.mark.ray
APP = "security"


@pytest.fixture(scope="module")
def studio(ray_cluster, chat_data):
    from ray import serve

    from sage_ray.serve.deploy import deploy_studio
    from sage_ray.serve.settings import StudioSettings

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # allow_hub=False: Hub ids as a Studio reachable from the network treats them (a loopback one allows them)
    settings = StudioSettings(sage_home=str(ray_cluster.sage_home), model="tiny", engine="hf", ui=False,
                              max_upload_mb=1, max_body_mb=2, max_prompt_chars=100_000, allow_hub=False)
    deploy_studio(settings, port=port, app_name=APP, timeout_s=300)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    uploaded = client.post("/api/finetune/upload-dataset", files={"file": ("chat.json", chat_data.read_bytes())})
    assert uploaded.status_code == 200, uploaded.text
    yield {"client": client, "home": ray_cluster.sage_home, "data": uploaded.json()["path"]}
    client.close()
    serve.shutdown()


def still_serving(client: httpx.Client) -> None:
    answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert client.get("/api/finetune/current-model").json()["name"] == "tiny-qwen2"


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


def test_a_hub_id_or_an_outside_path_is_never_trained_on(studio):
    client, home = studio["client"], studio["home"]
    models_before = files_under(home / "models")
    jobs_before = {job["task_id"] for job in client.get("/api/finetune/tasks").json()}
    for route in ("/api/finetune/plan", "/api/finetune/create"):
        hub = client.post(route, json={"model": "Qwen/Qwen2.5-0.5B-Instruct", "data": studio["data"], "name": "x1"})
        assert hub.status_code == 403 and "Hugging Face Hub" in hub.json()["error"]["message"], hub.text
        outside = client.post(route, json={"model": "/etc", "data": studio["data"], "name": "x2"})
        assert outside.status_code == 403 and "outside the folders" in outside.json()["error"]["message"]
    assert files_under(home / "models") == models_before  # nothing downloaded
    assert {job["task_id"] for job in client.get("/api/finetune/tasks").json()} == jobs_before
    still_serving(client)


def test_a_loopback_studio_plans_a_hub_model_from_its_config_alone(studio):
    """Where Hub ids are allowed, the ingress reads config.json at most; the job downloads the rest.
    Here (no Hub), the plan fails fast naming the model, and nothing is written."""
    from sage_ray.serve.service import ServiceError, StudioService
    from sage_ray.serve.settings import StudioSettings

    home, hub_id = studio["home"], "sage-ray-tests/no-such-model-7f3a"
    models_before = files_under(home / "models")
    service = StudioService(StudioSettings(sage_home=str(home), model="tiny", ui=False))
    assert service.settings.hub_allowed()
    assert service._config({"model": hub_id, "data": studio["data"], "name": "hub1"}).model == hub_id
    started = time.monotonic()
    with pytest.raises(ServiceError, match=f"cannot read the config.json of '{hub_id}'") as refused:
        service.plan_job({"model": hub_id, "data": studio["data"], "name": "hub1"})
    assert 400 <= refused.value.status < 500 and time.monotonic() - started < 15
    assert files_under(home / "models") == models_before
    service.settings.allow_hub = False
    with pytest.raises(ServiceError, match="SAGE_STUDIO_ALLOW_HUB=1") as refused:
        service.plan_job({"model": hub_id, "data": studio["data"], "name": "hub1"})
    assert refused.value.status == 403


def test_a_query_parameter_a_route_does_not_take_is_refused(studio):
    client = studio["client"]
    typo = client.post("/api/finetune/switch-model", params={"model_path": "tiny", "require_beter": "true"})
    assert typo.status_code == 400 and "require_beter" in typo.json()["error"]["message"], typo.text
    assert client.get("/api/finetune/tasks", params={"status": "running"}).status_code == 400
    assert client.get("/api/finetune/switches", params={"limit": 2}).status_code == 200
    still_serving(client)


@pytest.mark.parametrize("name", ["demo", "tiny", "tiny-qwen2"])
def test_a_task_cannot_take_a_models_name(studio, name):
    client = studio["client"]
    taken = client.post("/api/finetune/create", json={"model": "tiny", "data": studio["data"], "name": name,
                                                      "max_steps": 1})
    assert taken.status_code == 409 and "pick another --name" in taken.json()["error"]["message"], taken.text
    assert name not in {job["task_id"] for job in client.get("/api/finetune/tasks").json()}
    still_serving(client)


def test_cross_site_posts_change_nothing(studio):
    client, home = studio["client"], studio["home"]
    evil = {"Origin": "https://evil.example"}
    datasets_before = files_under(home / "datasets")
    for request in (dict(params={"model_path": "tiny"}), dict(json={"model_path": "tiny"}), dict(),
                    dict(content=b"model_path=/etc", headers={"Content-Type": "application/x-www-form-urlencoded"})):
        headers = {**evil, **request.pop("headers", {})}
        refused = client.post("/api/finetune/switch-model", headers=headers, **request)
        assert refused.status_code == 403 and "cross-site" in refused.json()["error"]["message"]
    upload = client.post("/api/finetune/upload-dataset", headers=evil, files={"file": ("x.json", b"[]")})
    assert upload.status_code == 403 and files_under(home / "datasets") == datasets_before
    rebound = client.post("/api/finetune/switch-model", params={"model_path": "tiny"},
                          headers={"Host": "attacker.example", "Origin": "http://attacker.example"})
    assert rebound.status_code == 421
    still_serving(client)


def test_oversize_bodies_are_refused_as_they_arrive(studio):
    client, home = studio["client"], studio["home"]
    datasets_before = files_under(home / "datasets")
    big = client.post("/v1/chat/completions", content=b'{"messages": "' + b"x" * (3 * 2**20) + b'"}',
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "max_body_mb" in big.json()["error"]["message"]

    def chunks():  # a multipart upload sent without Content-Length: the guard counts the stream
        yield (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.json"\r\n'
               b"Content-Type: application/json\r\n\r\n[")
        for _ in range(40):
            yield b'{"instruction": "a", "output": "b"},' * 1800

    streamed = client.post("/api/finetune/upload-dataset", content=chunks(),
                           headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert streamed.status_code == 413 and "max_upload_mb" in streamed.json()["error"]["message"]
    assert files_under(home / "datasets") == datasets_before
    still_serving(client)


def test_a_huge_prompt_is_refused_while_another_client_streams(studio):
    client = studio["client"]
    streamed: list[str] = []

    def stream() -> None:
        body = {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 24, "stream": True}
        with httpx.stream("POST", f"{client.base_url}/v1/chat/completions", json=body, timeout=120) as response:
            streamed.extend(line for line in response.iter_lines() if line.startswith("data:"))

    other = threading.Thread(target=stream)
    other.start()
    huge = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 2**20}],
                                                     "max_tokens": 3})
    other.join(timeout=120)
    assert huge.status_code == 400 and "max_prompt_chars" in huge.json()["error"]["message"], huge.text
    assert streamed and streamed[-1] == "data: [DONE]"
    still_serving(client)
