"""transformers Trainer callbacks that connect a worker to Ray Train and to the task's log."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from sage_ray.registry.taskfiles import append_log
from sage_ray.train.evaluation import eval_event
from sage_ray.train.preference import ALL_METRICS

CHECKPOINT_SUBDIR = "checkpoint"


class RayCheckpointCallback(TrainerCallback):
    """Hand each Trainer checkpoint to Ray Train, which keeps it in the task's checkpoints/.

    Only checkpoints go through `ray.train.report` (each report is a barrier of ~2 s in Ray
    Train V2); live metrics go through ProgressCallback instead.
    """

    def on_save(self, args, state, control, **kwargs):
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            source = get_last_checkpoint(args.output_dir) if Path(args.output_dir).exists() else None
            checkpoint = None
            if source is not None and state.is_world_process_zero:
                shutil.copytree(source, Path(tmp, CHECKPOINT_SUBDIR))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics={"step": state.global_step}, checkpoint=checkpoint)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class ProgressCallback(TrainerCallback):
    """On the first worker: a progress event per logging step, to `sink` and the task's log.

    tokens/s counts real (non-pad) tokens of all workers, measured from the end of the first
    step so that model loading and warm-up do not dilute the steady-state figure.
    """

    def __init__(self, sink: Callable[[dict], None]):
        self.sink = sink
        self.loss_history: list[tuple[int, float]] = []
        self.last_metrics: dict[str, float] = {}
        """The latest preference metrics (reward accuracy, margins...; empty for SFT)."""
        self.eval_history: list[list] = []
        """[[step, eval loss, token accuracy or None], ...] of every evaluation."""
        self._t0: float | None = None
        self._tokens0 = 0
        self.steady_tokens_per_s: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            self._t0, self._tokens0 = time.perf_counter(), state.num_input_tokens_seen

    def _rate(self, state) -> float | None:
        if self._t0 is None or state.global_step <= 1:
            return None
        elapsed = time.perf_counter() - self._t0
        return (state.num_input_tokens_seen - self._tokens0) / elapsed if elapsed > 0 else None

    def evaluated_at(self, step: int) -> bool:
        return bool(self.eval_history) and self.eval_history[-1][0] == step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        event = eval_event(metrics or {}, state.global_step)
        if not state.is_world_process_zero or event is None or self.evaluated_at(state.global_step):
            return
        self.eval_history.append([event["step"], event["eval_loss"], event.get("eval_token_accuracy")])
        self.sink(event)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        rate = self._rate(state)
        self.steady_tokens_per_s = rate
        step, total = state.global_step, state.max_steps
        eta = None
        if self._t0 is not None and step > 1:
            eta = (time.perf_counter() - self._t0) / (step - 1) * (total - step)
        self.loss_history.append((step, float(logs["loss"])))
        metrics = {key: round(float(logs[key]), 4) for key in ALL_METRICS if logs.get(key) is not None}
        self.last_metrics = metrics or self.last_metrics
        event = {
            "event": "progress", "step": step, "total_steps": total,
            "epoch": round(state.epoch or 0.0, 3), "progress": round(100.0 * step / max(total, 1), 1),
            "loss": round(float(logs["loss"]), 4), "learning_rate": logs.get("learning_rate"),
            "tokens_per_s": round(rate, 1) if rate else None, "eta_s": round(eta, 1) if eta is not None else None,
        }
        self.sink({**event, "metrics": metrics} if metrics else event)


class LogSink:
    """Writes progress events as readable lines through `log` (write_log's signature)."""

    def __init__(self, log: Callable[..., None]):
        self.log = log

    def __call__(self, event: dict) -> None:
        if event.get("event") == "eval":
            accuracy = event.get("eval_token_accuracy")
            self.log(f"eval at step {event['step']}: eval loss {event['eval_loss']:.4f}"
                     + (f" token accuracy {accuracy:.4f}" if accuracy is not None else ""), event)
            return
        line = (
            f"step {event['step']}/{event['total_steps']} ({event['progress']:.0f}%) "
            f"epoch {event['epoch']:.2f} loss {event['loss']:.4f} "
            f"tokens/s {event['tokens_per_s'] or '-'} eta {format_eta(event['eta_s'])}"
        )
        line += "".join(f" {name} {value:.4f}" for name, value in (event.get("metrics") or {}).items())
        self.log(line, event)


def write_log(log_path: Path, line: str, event: dict | None = None) -> None:
    """One line to stdout and train.log; events also as JSON so tools can parse progress."""
    append_log(log_path, log_text(line, event))


ECHO = {"stdout": True}  # off where a follower already shows train.log (the CLI's in-process runs)


def log_text(line: str, event: dict | None = None) -> str:
    """What `line` (and `event`) add to train.log, echoed to stdout (the Ray job log) too."""
    if ECHO["stdout"]:
        # not print(): Ray Train patches print on workers to both log and echo, doubling each line
        sys.stdout.write(f"[sage-ray] {line}\n")
        sys.stdout.flush()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = "".join(f"{stamp} {part}\n" for part in line.splitlines())
    return text + (f"{stamp} EVENT {json.dumps(event)}\n" if event is not None else "")


class KeepBest(TrainerCallback):
    """keep 'best': a copy of the adapter's weights at the evaluation with the lowest eval loss
    (LoRA weights: megabytes), put back into the model before it is saved."""

    def __init__(self, model) -> None:
        self.model = model
        self.best: tuple[float, int, dict] | None = None  # (eval loss, step, weights)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and (self.best is None or loss < self.best[0]):
            from peft import get_peft_model_state_dict

            weights = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self.model).items()}
            self.best = (float(loss), state.global_step, weights)

    def restore(self) -> dict[str, Any] | None:
        """Put the best weights back; what was kept ({"keep", "step", "eval_loss"}), None if nothing was evaluated."""
        if self.best is None:
            return None
        from peft import set_peft_model_state_dict

        loss, step, weights = self.best
        set_peft_model_state_dict(self.model, weights)
        return {"keep": "best", "step": step, "eval_loss": round(loss, 4)}
