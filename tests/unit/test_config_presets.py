"""TrainConfig validation, YAML round trip, presets (explicit values win) and the memory estimate."""

from __future__ import annotations

import pytest

from sage_ray import presets
from sage_ray.config import ConfigError, LoraConfig, TrainConfig, dump_train_config, load_train_config, parse_train_config
from sage_ray.presets import GiB, DeviceInfo, DoesNotFitError, apply_preset, check_fits, estimate_memory, select_auto

GPU_12G = DeviceInfo("cuda", "RTX 3060", 12 * GiB, 11 * GiB, bf16=True)
CPU = DeviceInfo("cpu", "CPU", 24 * GiB, 20 * GiB)

# Qwen2.5-7B's config.json (the fields the estimate reads).
QWEN_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
QWEN_1_5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def test_both_quantizations_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        parse_train_config({"load_in_4bit": True, "load_in_8bit": True}, source="job.yaml")
    assert "job.yaml" in str(err.value) and "load_in_4bit and load_in_8bit" in str(err.value)
    assert "pick one" in str(err.value)


def test_both_precisions_refused():
    with pytest.raises(ConfigError, match="bf16 and fp16 are both true: pick one"):
        parse_train_config({"bf16": True, "fp16": True})


@pytest.mark.parametrize("field", ["r", "alpha"])
def test_nonpositive_lora_rank_names_field(field):
    with pytest.raises(ConfigError) as err:
        parse_train_config({"lora": {field: 0}}, source="x.yaml")
    message = str(err.value)
    assert f"field 'lora.{field}'" in message and "positive integer" in message and "try 8" in message


def test_unknown_key_named_with_hint(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: tiny\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert f"{path}: field 'learning_rate': unknown key" in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_train_config(tmp_path / "missing.yaml")


def test_every_field_is_described():
    for model in (TrainConfig, LoraConfig):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(model="tiny", data="d.json", epochs=2, lora=LoraConfig(r=4), merge=True)
    path = tmp_path / "job.yaml"
    dump_train_config(cfg, path, header="ray job submit -- python -m sage_ray.train job.yaml")
    assert path.read_text().startswith("# ray job submit")
    assert load_train_config(path) == cfg


def test_explicit_values_win_over_preset():
    cfg = TrainConfig(preset="rtx_3060", batch_size=3, max_length=256, load_in_8bit=False,
                      lora=LoraConfig(alpha=64))
    resolved = apply_preset(cfg, GPU_12G)
    assert resolved.batch_size == 3 and resolved.max_length == 256 and resolved.load_in_8bit is False
    assert resolved.lora.alpha == 64
    # the rest comes from the preset
    assert resolved.grad_accum == 16 and resolved.gradient_checkpointing is True
    assert resolved.optimizer == "paged_adamw_8bit" and resolved.lora.r == 8


def test_preset_factories_match_table():
    table = {
        "minimal": ("4bit", 512, 1, 32, True, "paged_adamw_8bit", 4, 8),
        "rtx_3060": ("8bit", 1024, 1, 16, True, "paged_adamw_8bit", 8, 16),
        "rtx_4090": ("none", 2048, 4, 4, False, "adamw_torch", 8, 16),
        "a100": ("none", 4096, 8, 2, False, "adamw_torch", 16, 32),
    }
    for name, expected in table.items():
        cfg = getattr(presets, name)()
        got = (cfg.quantization, cfg.max_length, cfg.batch_size, cfg.grad_accum, cfg.gradient_checkpointing,
               cfg.optimizer, cfg.lora.r, cfg.lora.alpha)
        assert got == expected, name
    assert presets.a100().bf16 and presets.h100().bf16 and not presets.cpu().bf16


def test_preset_object_is_editable_like_the_mission_example():
    cfg = presets.rtx_3060()
    cfg.model = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    cfg.data = "./my_data.json"
    assert cfg.preset == "rtx_3060" and cfg.model.startswith("Qwen/")
    with pytest.raises(ValueError):
        cfg.batch_size = 0


@pytest.mark.parametrize(("free_gib", "expected"), [(79, "h100"), (40, "a100"), (23, "rtx_4090"),
                                                      (11.5, "rtx_3060"), (6, "minimal")])
def test_auto_picks_by_free_gpu_memory(free_gib, expected):
    device = DeviceInfo("cuda", "gpu", 80 * GiB, int(free_gib * GiB), bf16=True)
    assert select_auto(device) == expected
    assert apply_preset(TrainConfig(), device).preset == expected


def test_auto_without_gpu_is_cpu_and_cpu_never_gets_fp16():
    resolved = apply_preset(TrainConfig(preset="minimal"), CPU)
    assert resolved.fp16 is False and resolved.load_in_4bit is True and resolved.optimizer == "adamw_torch"
    explicit = apply_preset(TrainConfig(preset="minimal", optimizer="paged_adamw_8bit"), CPU)
    assert explicit.optimizer == "paged_adamw_8bit"  # the user's choice is kept, even where it will fail
    assert apply_preset(TrainConfig(), CPU).preset == "cpu"


def test_gpu_without_bf16_falls_back_to_fp16():
    old_gpu = DeviceInfo("cuda", "T4", 16 * GiB, 15 * GiB, bf16=False)
    resolved = apply_preset(TrainConfig(preset="rtx_3060"), old_gpu)
    assert resolved.bf16 is False and resolved.fp16 is True


def test_memory_estimate_orders_presets_and_counts_parameters():
    est = {name: estimate_memory(QWEN_7B, apply_preset(TrainConfig(preset=name), GPU_12G)).total
           for name in ("minimal", "rtx_3060", "rtx_4090", "a100")}
    assert est["minimal"] < est["rtx_3060"] < est["rtx_4090"] < est["a100"]
    params = estimate_memory(QWEN_7B, apply_preset(TrainConfig(preset="minimal"), GPU_12G)).params
    assert 7.4e9 < params < 7.8e9  # Qwen2.5-7B has 7.6B parameters
    small = estimate_memory(QWEN_1_5B, apply_preset(TrainConfig(preset="minimal"), GPU_12G)).params
    assert 1.4e9 < small < 1.65e9


def test_too_big_is_refused_with_estimate_and_preset_to_try():
    cfg = apply_preset(TrainConfig(preset="rtx_4090"), GPU_12G)
    with pytest.raises(DoesNotFitError) as err:
        check_fits(QWEN_7B, cfg, GPU_12G)
    message = str(err.value)
    assert "GiB" in message and "RTX 3060" in message and "try --preset rtx_3060" in message
    gpu_8g = DeviceInfo("cuda", "RTX 3070", 8 * GiB, 7.5 * GiB, bf16=True)
    with pytest.raises(DoesNotFitError, match="try --preset minimal"):
        check_fits(QWEN_7B, apply_preset(TrainConfig(preset="rtx_3060"), gpu_8g), gpu_8g)
    assert check_fits(QWEN_1_5B, apply_preset(TrainConfig(preset="rtx_3060"), GPU_12G), GPU_12G).total < 11 * GiB


def test_method_and_beta_are_checked():
    assert TrainConfig().method == "sft" and TrainConfig(method="dpo", beta=0.2).beta == 0.2
    with pytest.raises(ConfigError, match="field 'method'"):
        parse_train_config({"method": "ppo"})
    with pytest.raises(ConfigError, match="beta applies to the preference methods"):
        parse_train_config({"beta": 0.1})  # sft has no beta: never silently ignored
    with pytest.raises(ConfigError, match="train_on_prompt applies to method sft only"):
        parse_train_config({"method": "orpo", "train_on_prompt": True})
    with pytest.raises(ConfigError, match="batch_size must be at least 2 for method kto"):
        parse_train_config({"method": "kto", "batch_size": 1})


def test_kto_gets_two_examples_per_batch_with_the_same_effective_batch():
    resolved = apply_preset(TrainConfig(preset="rtx_3060", method="kto"), GPU_12G)
    assert (resolved.batch_size, resolved.grad_accum) == (2, 8)  # the preset's 1 x 16
    explicit = apply_preset(TrainConfig(preset="rtx_3060", method="kto", grad_accum=16), GPU_12G)
    assert (explicit.batch_size, explicit.grad_accum) == (2, 16)  # the user's grad_accum is kept
    assert apply_preset(TrainConfig(preset="rtx_3060", method="dpo"), GPU_12G).batch_size == 1
