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
