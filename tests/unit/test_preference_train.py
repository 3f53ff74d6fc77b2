"""TRL's preference trainers as the worker loop builds them (no Ray; the runs on Ray Train are in
tests/integration/test_preference_ray.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_ray.config import TrainConfig
from sage_ray.data.tokenize import load_tokenizer
from sage_ray.presets import apply_preset
from sage_ray.train.loop import load_lora_model, training_kwargs
from sage_ray.train.preference import preference_rows, preference_trainer, prepare_preference_data
from sage_ray.data import load_dataset

PAIRS = Path(__file__).resolve().parents[2] / "sage_ray" / "quickstart" / "preference.jsonl"


def build(tiny_model_dir, tmp_path, max_length: int, lines: list):
    cfg = apply_preset(TrainConfig(method="dpo", data=str(PAIRS), max_length=max_length, max_steps=1))
    _dataset, rows, _stats = prepare_preference_data(cfg)
    model = load_lora_model(str(tiny_model_dir), cfg, on_gpu=False)
    return preference_trainer(cfg, model, load_tokenizer(str(tiny_model_dir)), rows,
                              training_kwargs(cfg, str(tmp_path), False), [], lines.append)


def test_rows_dropped_for_length_are_reported_and_all_dropped_is_refused(tiny_model_dir, tmp_path):
    lines: list[str] = []
    trainer = build(tiny_model_dir, tmp_path, 20, lines)  # the system-prompt pair's prompt is over 20 tokens
    assert 0 < len(trainer.train_dataset) < 16
    assert lines and lines[0].endswith("rows dropped: their prompt alone fills max_length=20")
    with pytest.raises(ValueError, match="every prompt alone fills max_length=9 tokens"):
        build(tiny_model_dir, tmp_path, 9, [])


def test_kto_unpairs_preference_pairs():
    dataset = load_dataset(PAIRS, method="kto")
    rows = preference_rows(dataset, "kto")
    assert len(rows) == 32 and [row["label"] for row in rows[:2]] == [True, False]
    assert rows[0]["completion"] == dataset.examples[0].chosen and rows[1]["completion"] == dataset.examples[0].rejected
