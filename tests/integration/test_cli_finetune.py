"""`sage finetune start | cancel | resume | delete | merge | quickstart` on the session's Ray
cluster (jobs go through Ray Jobs; quickstart runs in-process), with the tiny model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sage_ray.cli import app

runner = CliRunner(env={"COLUMNS": "400"})  # rich wraps at the terminal width


def test_start_then_merge(ray_cluster, tiny_model_dir, chat_data):
    result = runner.invoke(app, ["finetune", "start", "--model", str(tiny_model_dir), "--data", str(chat_data),
                                 "--max-steps", "2", "--batch-size", "2", "--max-length", "128",
                                 "--lora-r", "4", "--name", "cli-start", "--cpus-per-worker", "1",
                                 "--address", ray_cluster.address, "--wait"])
    assert result.exit_code == 0, result.output
    assert "submitted task cli-start" in result.output and "done task cli-start: lora model at" in result.output
    assert "step 2/2" in result.output  # the progress bar's last state
    task = ray_cluster.sage_home / "studio_finetune" / "cli-start"
    meta = json.loads((task / "finetune_meta.json").read_text())
    assert meta["type"] == "lora" and meta["config"]["lora"]["r"] == 4 and meta["config"]["batch_size"] == 2

    merged = runner.invoke(app, ["finetune", "merge", "cli-start"])
    assert merged.exit_code == 0, merged.output
    assert (task / "merged_model" / "model.safetensors").exists()
    assert json.loads((task / "finetune_meta.json").read_text())["type"] == "merged"


def test_start_with_bad_dataset_exits_with_the_location(ray_cluster, tiny_model_dir, tmp_path):
    data = tmp_path / "qa.json"
    data.write_text('[{"question": "Why?", "answer": "Because."}, {"question": "How?"}]')
    result = runner.invoke(app, ["finetune", "start", "--model", str(tiny_model_dir), "--data", str(data)])
    assert result.exit_code == 1
    assert "qa.json, record 2" in result.output and "answer" in result.output


def test_cancel_resume_and_delete(ray_cluster, tiny_model_dir, chat_data):
    """Cancel right after submitting (before any checkpoint: test_jobs covers resuming from one),
    resume with --wait, delete. Also the refusals: delete while running, resume when completed."""
    started = runner.invoke(app, ["finetune", "start", "--model", str(tiny_model_dir), "--data", str(chat_data),
                                  "--max-steps", "4", "--batch-size", "2", "--max-length", "128",
                                  "--name", "cli-cr", "--cpus-per-worker", "1", "--address", ray_cluster.address])
    assert started.exit_code == 0, started.output
    assert started.stdout.strip().splitlines()[-1] == "cli-cr"  # the task id, alone on stdout
    busy = runner.invoke(app, ["finetune", "delete", "cli-cr", "--yes", "--address", ray_cluster.address])
    assert busy.exit_code == 1 and "cancel it first" in busy.output
    cancelled = runner.invoke(app, ["finetune", "cancel", "cli-cr", "--address", ray_cluster.address])
    assert cancelled.exit_code == 0 and "cli-cr: cancelled" in cancelled.output, cancelled.output

    resumed = runner.invoke(app, ["finetune", "resume", "cli-cr", "--wait", "--address", ray_cluster.address])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed task cli-cr: " in resumed.output
    assert "done task cli-cr: lora model at" in resumed.output
    again = runner.invoke(app, ["finetune", "resume", "cli-cr", "--address", ray_cluster.address])
    assert again.exit_code == 1 and "nothing to resume" in again.output

    task = ray_cluster.sage_home / "studio_finetune" / "cli-cr"
    assert (task / "lora" / "adapter_model.safetensors").exists()
    deleted = runner.invoke(app, ["finetune", "delete", "cli-cr", "--yes", "--address", ray_cluster.address])
    assert deleted.exit_code == 0, deleted.output
    assert not task.exists()
    gone = runner.invoke(app, ["finetune", "status", "cli-cr"])
    assert gone.exit_code == 1 and "no fine-tune job 'cli-cr'" in gone.output


def test_merge_of_unknown_task_is_a_clear_error(ray_cluster):
    result = runner.invoke(app, ["finetune", "merge", "no-such-task"])
    assert result.exit_code == 1 and "has no completed fine-tune" in result.output


def test_quickstart_trains_and_replies(ray_cluster, tiny_model_dir):
    result = runner.invoke(app, ["finetune", "quickstart", "qa", "--model", str(tiny_model_dir),
                                 "--max-steps", "2", "--name", "qs-qa"])
    assert result.exit_code == 0, result.output
    assert "merged model at" in result.output and "What is the capital of Egypt?" in result.output
    assert "fine-tuned model" in result.output
    # the held-out figures of base and fine-tune: 10% of the 50+ records were held out
    assert "held-out records (5): base vs fine-tune" in result.output and "fine-tune (qs-qa)" in result.output
    assert result.output.count("effective config") == 1, result.output  # once: from train.log, not echoed too
    assert (ray_cluster.sage_home / "studio_finetune" / "qs-qa" / "merged_model" / "config.json").exists()


def test_list_status_logs_and_model_show(ray_cluster, tiny_model_dir, chat_data):
    if not (ray_cluster.sage_home / "studio_finetune" / "cli-start" / "merged_model").exists():
        test_start_then_merge(ray_cluster, tiny_model_dir, chat_data)  # when this test runs alone
    listed = runner.invoke(app, ["finetune", "list"])
    assert listed.exit_code == 0 and "cli-start" in listed.output and "completed" in listed.output
    status = runner.invoke(app, ["finetune", "status", "cli-start"])
    assert status.exit_code == 0 and "completed" in status.output and "merged: cli-start" in status.output
    logs = runner.invoke(app, ["finetune", "logs", "cli-start", "--follow"])
    assert logs.exit_code == 0 and "step 2/2" in logs.output and "merged: " in logs.output
    db = ray_cluster.sage_home / "registry.db"
    before = [path.read_bytes() for path in (db, db.with_name("registry.db-wal")) if path.exists()]
    models = runner.invoke(app, ["llm", "model", "show"])
    assert models.exit_code == 0 and "cli-start" in models.output and "merged" in models.output
    after = [path.read_bytes() for path in (db, db.with_name("registry.db-wal")) if path.exists()]
    assert after == before  # read through the live actor: the CLI never writes its store
    unknown = runner.invoke(app, ["finetune", "status", "nope"])
    assert unknown.exit_code == 1 and "no fine-tune job 'nope'" in unknown.output
