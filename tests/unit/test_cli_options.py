"""`sage finetune start`: a config file's values, with the options given on top; help texts."""

from __future__ import annotations

from typer.testing import CliRunner

from sage_ray.cli import app
from sage_ray.cli.finetune import build_config
from sage_ray.config import LoraConfig, TrainConfig


def test_options_override_config_file_and_unset_stay_unset():
    base = TrainConfig(model="tiny", data="a.json", batch_size=2, lora=LoraConfig(r=8, alpha=32))
    cfg = build_config(base, task=None, model=None, data=None, preset="rtx_4090", epochs=None, max_steps=None,
                       batch_size=None, grad_accum=None, lr=None, lora_r=16, lora_alpha=None, max_length=None,
                       num_workers=None, name=None, merge=None)
    assert (cfg.model, cfg.data, cfg.batch_size, cfg.preset) == ("tiny", "a.json", 2, "rtx_4090")
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 32)
    assert cfg.grad_accum is None and cfg.max_length is None  # left for the preset


def test_help_lists_every_mission_option():
    result = CliRunner().invoke(app, ["finetune", "start", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--task", "--model", "--data", "--preset", "--epochs", "--batch-size", "--lr", "--lora-r",
                   "--lora-alpha", "--max-length", "--name", "--merge", "--method", "--beta"):
        assert option in result.output, option


def test_unknown_quickstart_task_is_refused():
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["finetune", "quickstart", "poetry"])
    assert result.exit_code == 1 and "choose one of code, qa, chat, instruction" in result.output


def test_finetune_list_never_cuts_a_task_id_on_a_narrow_terminal():
    from rich.console import Console

    from sage_ray.cli.finetune import jobs_table

    ids = ["qs-instruction-20261201-101500-abcd", "my-long-fine-tune-of-the-demo-model-v2"]
    jobs = [{"task_id": task_id, "status": "completed", "status_detail": "merged and registered", "progress": 100,
             "step": 12, "total_steps": 12, "loss": 1.2345, "created_at": "2026-12-01T10:15:00+00:00",
             "config": {"model": "/root/.sage/models/SmolLM2-135M-Instruct"}} for task_id in ids]
    console = Console(width=80, record=True)
    console.print(jobs_table(jobs))
    lines = console.export_text().splitlines()
    assert all(any(task_id in line for line in lines) for task_id in ids)
    assert max(len(line) for line in lines) <= 80


def test_start_refuses_preference_data_as_sft_and_beta_without_a_preference_method(tmp_path, monkeypatch):
    """Both fail in `jobs.prepare`, before any cluster is started or joined."""
    from pathlib import Path

    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "home"))
    pairs = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart" / "preference.jsonl"
    runner = CliRunner(env={"COLUMNS": "400"})
    as_sft = runner.invoke(app, ["finetune", "start", "--model", "tiny", "--data", str(pairs)])
    assert as_sft.exit_code == 1 and "preference.jsonl, line 1" in as_sft.output
    assert "--method dpo" in as_sft.output
    beta = runner.invoke(app, ["finetune", "start", "--model", "tiny", "--data", str(pairs), "--beta", "0.2"])
    assert beta.exit_code == 1 and "field 'beta': beta applies to the preference methods" in beta.output
