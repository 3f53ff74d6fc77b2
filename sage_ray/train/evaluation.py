"""Evaluation during an SFT run: eval loss and token accuracy on the validation set.

Token accuracy is the share of trainable (assistant) tokens whose greedy next-token guess is
right. Logits are reduced to their argmax per batch before the Trainer gathers them, so the
evaluation holds one integer per token instead of a vocabulary-sized row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sage_ray.data.tokenize import IGNORE_INDEX

EVALS_PER_RUN = 10  # eval_steps None: evaluate about this many times per run


def eval_kwargs(eval_steps: int | None, batch_size: int) -> dict[str, Any]:
    """TrainingArguments for evaluating every `eval_steps` (None: a tenth of the run's steps)."""
    return {"eval_strategy": "steps",
            # a float below 1 is a fraction of the run's total steps to transformers
            "eval_steps": eval_steps or 1 / EVALS_PER_RUN,
            "per_device_eval_batch_size": batch_size}


def argmax_logits(logits, labels):
    """Per batch, before gathering: the predicted token ids, not the logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def token_accuracy(prediction) -> dict[str, float]:
    """compute_metrics: the share of label tokens predicted right (position t predicts t+1)."""
    predicted = np.asarray(prediction.predictions)[..., :-1]
    labels = np.asarray(prediction.label_ids)[..., 1:]
    scored = labels != IGNORE_INDEX
    total = int(scored.sum())
    return {"token_accuracy": float((predicted[scored] == labels[scored]).sum() / total) if total else 0.0}


def eval_event(metrics: dict[str, Any], step: int) -> dict[str, Any] | None:
    """The registry's eval event from the Trainer's metrics (None when they carry no eval loss)."""
    if metrics.get("eval_loss") is None:
        return None
    event = {"event": "eval", "step": step, "eval_loss": round(float(metrics["eval_loss"]), 4)}
    if metrics.get("eval_token_accuracy") is not None:
        event["eval_token_accuracy"] = round(float(metrics["eval_token_accuracy"]), 4)
    return event


def final_eval(history: list[list]) -> dict[str, Any]:
    """What the run's figures say of its evaluations: the last ones and the best loss."""
    step, loss, accuracy = history[-1]
    best = min(history, key=lambda point: point[1])
    return {"eval_loss": loss, "eval_token_accuracy": accuracy, "best_eval_loss": best[1],
            "best_eval_step": best[0]}

