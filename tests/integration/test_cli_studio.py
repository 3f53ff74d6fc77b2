"""`sage studio start | status | logs | stop` and `sage chat` on the session's Ray cluster.

A real tiny fine-tune (2 steps) is the "newest completed fine-tune" the Studio serves. The
tests run in order: the Studio is started by the CLI, used, then stopped; at the end Serve is
shut down so the next module can start it on its own port.
"""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from sage_ray.cli import app
from tests.ray_cluster import free_port

pytestmark = pytest.mark.ray
runner = CliRunner(env={"COLUMNS": "400"})  # rich wraps at the terminal width
TASK = "studio-cli-ft"


@pytest.fixture(scope="module")
def finetuned(ray_cluster, chat_data):
    """A completed LoRA fine-tune of the tiny model, made by the real trainer."""
    from sage_ray import LoraConfig, TrainConfig
    from sage_ray.train.trainer import finetune

    cfg = TrainConfig(name=TASK, task="code", model="tiny", data=str(chat_data), max_steps=2, batch_size=2,
                      max_length=128, lora=LoraConfig(r=4, alpha=8), cpus_per_worker=1)
    return finetune(cfg, log_to_driver=False)


@pytest.fixture(scope="module")
def port(ray_cluster):
    """The Studio's port for this module; Serve is shut down at the end whatever happened."""
    from ray import serve

    yield free_port()
    serve.shutdown()


def url_of(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def serve_apps() -> dict:
    from sage_ray.serve.deploy import serve_details

    return serve_details().get("applications") or {}


def test_list_finetuned_prints_the_mission_format(finetuned):
    result = runner.invoke(app, ["studio", "start", "--list-finetuned"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    count = int(lines[0].removeprefix("Fine-tuned models (").removesuffix("):"))
    assert count >= 1 and sum(1 for line in lines if line[:1].isdigit()) == count
    assert lines[1:6] == [f"1. {TASK}", "   type: lora", f"   base model: {finetuned.meta['base_model']}",
                          f"   path: {finetuned.paths.lora}", lines[5]]
    assert lines[5].startswith("   completed: 20")
    assert lines[-1] == ("Use: sage studio start --use-finetuned   |   "
                         "sage studio start --llm-model <path or task id>")
    assert "studio" not in serve_apps()  # listing deploys nothing


def test_status_while_stopped_says_how_to_start(ray_cluster):
    result = runner.invoke(app, ["studio", "status"])
    assert result.exit_code == 3, result.output
    assert "not running" in result.output and "sage studio start" in result.output


def test_unknown_model_and_taken_port_fail_before_deploying(finetuned, port):
    unknown = runner.invoke(app, ["studio", "start", "--llm-model", "no-such-model", "--no-browser"])
    assert unknown.exit_code == 1
    assert "no model named 'no-such-model'" in unknown.output and "--list-finetuned" in unknown.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = runner.invoke(app, ["studio", "start", "--port", str(busy), "--no-browser", "--no-ui",
                                     "--llm-model", "tiny"])
    assert result.exit_code == 1
    assert f"port {busy} on 127.0.0.1 is taken" in result.output and "--port" in result.output
    assert "studio" not in serve_apps()


def test_start_use_finetuned_serves_the_newest_finetune(finetuned, port):
    from sage_ray.client import StudioClient

    result = runner.invoke(app, ["studio", "start", "--use-finetuned", "--no-browser", "--no-ui", "--engine", "hf",
                                 "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == url_of(port)
    assert f"serving the newest fine-tune: {TASK}" in result.output and f"{url_of(port)}/v1" in result.output
    with StudioClient(url_of(port)) as client:
        current = client.models.current()
    assert current.name == TASK and current.kind == "lora" and current.state == "active"


def test_second_start_on_another_port_is_refused(port):
    result = runner.invoke(app, ["studio", "start", "--port", str(port + 1), "--no-browser", "--no-ui",
                                 "--llm-model", "tiny"])
    assert result.exit_code == 1
    assert f"already listens on 127.0.0.1:{port}" in result.output


def test_status_while_running(port):
    result = runner.invoke(app, ["studio", "status"])
    assert result.exit_code == 0, result.output
    assert f"studio: RUNNING at {url_of(port)}" in result.stdout
    assert "LLMServer: HEALTHY, 1/1 replicas running" in result.stdout
    assert "StudioIngress: HEALTHY" in result.stdout
    assert f"model: {TASK} (lora), active" in result.stdout and "running jobs: 0" in result.stdout


def reply(port: int, prompt: str, **options) -> str:
    """The reply the Studio gives to one prompt, through the SDK (greedy: the same every time)."""
    from sage_ray.client import StudioClient

    with StudioClient(url_of(port)) as client:
        return client.chat(prompt, temperature=0, **options)


def test_chat_with_piped_input_streams_replies(port):
    result = runner.invoke(app, ["chat", "--base-url", url_of(port), "--max-tokens", "6", "--temperature", "0"],
                           input="hello\n/reset\nhello\n")
    assert result.exit_code == 0, result.output
    expected = reply(port, "hello", max_tokens=6)
    assert expected and result.stdout == f"{expected}\n{expected}\n"  # /reset: the same prompt, the same reply
    assert "conversation forgotten" in result.output


def test_chat_keeps_the_history(port):
    from sage_ray.client import StudioClient

    result = runner.invoke(app, ["chat", "--base-url", url_of(port), "--max-tokens", "4", "--temperature", "0"],
                           input="hello\nagain\n")
    assert result.exit_code == 0, result.output
    first = reply(port, "hello", max_tokens=4)
    with StudioClient(url_of(port)) as client:
        second = client.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "again"}], max_tokens=4, temperature=0)
    assert result.stdout == f"{first}\n{second}\n"


def test_finetune_chat_talks_to_the_task_model(port):
    result = runner.invoke(app, ["finetune", "chat", TASK, "--base-url", url_of(port), "--max-tokens", "4",
                                 "--temperature", "0"], input="hi\n/exit\nnot sent\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == reply(port, "hi", model=TASK, max_tokens=4) + "\n"


def test_the_seeds_commands_name_a_fine_tune_by_its_task_type(port):
    """SAGE's `sage finetune chat code` / `sage chat --backend finetune --finetune-model code`: a task
    type names its newest completed fine-tune (here the module's, trained with task "code")."""
    expected = reply(port, "hi", model=TASK, max_tokens=4) + "\n"
    by_type = runner.invoke(app, ["finetune", "chat", "code", "--base-url", url_of(port), "--max-tokens", "4",
                                  "--temperature", "0"], input="hi\n")
    assert by_type.exit_code == 0 and by_type.stdout == expected, by_type.output
    backend = runner.invoke(app, ["chat", "--backend", "finetune", "--finetune-model", "code", "--base-url",
                                  url_of(port), "--max-tokens", "4", "--temperature", "0"], input="hi\n")
    assert backend.exit_code == 0 and backend.stdout == expected, backend.output


def test_chat_with_an_unknown_model_exits_1(port):
    result = runner.invoke(app, ["chat", "--base-url", url_of(port), "--model", "nope"], input="hi\n")
    assert result.exit_code == 1 and "no model named 'nope'" in result.output and "HTTP 404" in result.output


def test_logs_show_the_replicas(port):
    result = runner.invoke(app, ["studio", "logs", "--lines", "3"])
    assert result.exit_code == 0, result.output
    assert "==> replica_studio_LLMServer_" in result.stdout and "==> replica_studio_StudioIngress_" in result.stdout


def test_restart_keeps_port_and_switched_model(port):
    from sage_ray.client import StudioClient

    with StudioClient(url_of(port)) as client:
        assert client.models.switch("tiny") == "switched and active"
    result = runner.invoke(app, ["studio", "restart"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == url_of(port) and "with model tiny" in result.output
    with StudioClient(url_of(port)) as client:
        current = client.models.current()
    assert current.name == "tiny-qwen2" and current.state == "active"


def test_stop_then_status(port):
    result = runner.invoke(app, ["studio", "stop"])
    assert result.exit_code == 0, result.output
    assert "stopped the Studio" in result.output
    status = runner.invoke(app, ["studio", "status"])
    assert status.exit_code == 3 and "studio: not running" in status.stdout
    from sage_ray.client import StudioClient, StudioUnavailableError

    with StudioClient(url_of(port)) as client, pytest.raises(StudioUnavailableError, match="sage studio start"):
        client.models.list()
