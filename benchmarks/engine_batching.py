"""In-process serving benchmark of the hf engine: batching throughput and LoRA adapter switching.

    .venv/bin/python benchmarks/engine_batching.py [--model demo] [--tokens 48] [--rounds 3] [--device cpu]

Prints tokens/s at concurrency 1, 4 and 8 (every request greedy, `--tokens` tokens, no early
stop so all requests do equal work), the ratio to concurrency 1, and the latency of
load_adapter: from disk (a new adapter) and for an adapter already loaded (the switch a
request sees: choosing it by name), as p50 / p99 over repeated calls. Needs no Ray.

On a machine shared with other work, pass --threads 1: two OpenMP threads on two busy
cores spin-wait for each other and the wall clock then measures the neighbours. Tokens
per CPU second are printed too; they stay comparable under load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sage_ray.models import resolve_model
from sage_ray.serve.engines import ModelSpec, SamplingParams, complete, create_engine

PROMPTS = [
    "Explain what a LoRA adapter is in two sentences.",
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "Give three tips for writing clear documentation.",
    "What does a tokenizer do?",
    "Name three uses of a hash map.",
    "Summarise the water cycle.",
    "Why is the sky blue?",
]


async def throughput(engine, concurrency: int, tokens: int, adapters: list[str | None]) -> tuple[float, float]:
    """Generated tokens per wall-clock second and per CPU second of this process, `concurrency` requests at once.

    On a machine shared with other work the wall clock measures the neighbours as much as
    the engine; CPU seconds (all threads of this process) do not, and with --threads 1 they
    are the engine's compute time without OpenMP spin-waiting.
    """
    # ignore_eos: every request produces exactly `tokens` tokens, so all levels do equal work.
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    replies = await asyncio.gather(*[
        complete(engine.chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                             adapter=adapters[i % len(adapters)], params=params))
        for i in range(concurrency)
    ])
    generated = sum(r.completion_tokens for r in replies)
    return generated / (time.perf_counter() - started), generated / (time.process_time() - cpu_started)


def make_adapter(base: Path, folder: Path, seed: int, rank: int = 8) -> Path:
    """A random LoRA adapter of `base` (lora_B non-zero, so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def adapter_latency(engine, base: Path, work: Path, repeats: int) -> dict[str, list[float]]:
    folders = [make_adapter(base, work / f"lora{i}", seed=i) for i in range(2)]
    fresh, loaded = [], []
    for i in range(repeats):
        for j, folder in enumerate(folders):
            name = f"a{j}"
            await engine.unload_adapter(name)
            started = time.perf_counter()
            await engine.load_adapter(ModelSpec(name, str(folder), "lora", base_path=str(base)))
            fresh.append((time.perf_counter() - started) * 1000)
    for i in range(repeats * 5):
        started = time.perf_counter()
        await engine.load_adapter(ModelSpec(f"a{i % 2}", str(folders[i % 2]), "lora", base_path=str(base)))
        loaded.append((time.perf_counter() - started) * 1000)
    return {"load from disk": fresh, "already loaded": loaded}


async def main(args: argparse.Namespace) -> None:
    base = resolve_model(args.model)
    engine = create_engine("hf", device=args.device, threads=args.threads)
    await engine.start(ModelSpec(args.model, str(base), "base"))
    print(f"model {base} on {engine.stats()['device']}, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    await throughput(engine, 2, 4, [None])  # warm-up: first-call allocations
    levels = (1, 4, 8)
    rounds = {c: [] for c in levels}
    # The levels take turns within each round, so load from other processes on a shared
    # machine hits them alike; the median of the rounds is reported.
    for _ in range(args.rounds):
        for concurrency in levels:
            rounds[concurrency].append(await throughput(engine, concurrency, args.tokens, [None]))
    for clock, index in (("wall-clock", 0), ("CPU", 1)):
        single = statistics.median(r[index] for r in rounds[1])
        for concurrency in levels:
            values = [r[index] for r in rounds[concurrency]]
            median = statistics.median(values)
            print(f"concurrency {concurrency}: {median:6.1f} tokens per {clock} s, median of {args.rounds} "
                  f"(min {min(values):.1f}, max {max(values):.1f}); {median / single:.2f}x of concurrency 1")
    with tempfile.TemporaryDirectory() as work:
        latency = await adapter_latency(engine, base, Path(work), args.repeats)
        for label, values in latency.items():
            print(f"load_adapter, {label}: p50 {statistics.median(values):.1f} ms, "
                  f"p99 {percentile(values, 0.99):.1f} ms (n={len(values)})")
        wall, cpu = await throughput(engine, 8, args.tokens, [None, "a0", "a1"])
        print(f"concurrency 8, base/a0/a1 mixed in one batch: {wall:6.1f} tokens per wall-clock s, "
              f"{cpu:6.1f} per CPU s")
    print(f"batch sizes seen: {engine.stats()['batch_sizes']}; load average now {os.getloadavg()[0]:.1f}")
    await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model reference (default: the demo SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per request")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per concurrency level (median reported)")
    parser.add_argument("--repeats", type=int, default=10, help="adapter loads per adapter")
    asyncio.run(main(parser.parse_args()))
