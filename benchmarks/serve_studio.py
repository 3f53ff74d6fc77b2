"""Serving figures from one run, against baselines measured in the same script.

Starts its own local Ray cluster and the Studio (config deploy, engine hf) with the demo model
(SmolLM2-135M-Instruct) and two LoRA adapters made here, then prints:
  1. adapter switch latency p50/p99 through the Studio API (until the replica serves it; the
     config deploy that makes it survive a restart follows in the background);
  2. a full model swap (base -> merged) vs a cold load of the same model in-process;
  3. failed requests during 20 swaps under 4 streaming clients;
  4. generation tokens/s through HTTP at concurrency 1, 4 and 8;
  5. the HTTP path's overhead vs the engine in-process at concurrency 1.

    python benchmarks/serve_studio.py [--tokens 64] [--swaps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def generate(client: httpx.Client, tokens: int, model: str | None = None) -> tuple[int, float]:
    """One streamed chat; (completion tokens, seconds)."""
    body = {"messages": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": False}
    if model:
        body["model"] = model
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"], time.perf_counter() - start


def throughput(url: str, concurrency: int, tokens: int, rounds: int = 2) -> float:
    """Generated tokens per second with `concurrency` clients each sending `rounds` requests."""
    def client_run(_):
        with httpx.Client(base_url=url, timeout=600) as client:
            return sum(generate(client, tokens)[0] for _ in range(rounds))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(client_run, range(concurrency)))
    return total / (time.perf_counter() - start)


def in_process_tokens_per_s(model_dir: Path, merged_dir: Path, tokens: int, rounds: int = 2) -> tuple[float, float]:
    """The engine alone, same request, concurrency 1: (tokens/s of `model_dir`, seconds to
    cold-load `merged_dir`: the model the Studio's full swap loads, in a fresh engine)."""
    from sage_ray.serve.engines import ModelSpec, SamplingParams, complete, create_engine

    async def run():
        fresh = create_engine("hf")
        start = time.perf_counter()
        await fresh.start(ModelSpec("demo-merged", str(merged_dir), "merged"))
        cold = time.perf_counter() - start
        await fresh.shutdown()
        engine = create_engine("hf")
        await engine.start(ModelSpec("demo", str(model_dir), "base"))
        params = SamplingParams(max_tokens=tokens, temperature=0)
        await complete(engine.chat(PROMPT, params=params))  # warm-up, as the HTTP path had
        start, total = time.perf_counter(), 0
        for _ in range(rounds):
            total += (await complete(engine.chat(PROMPT, params=params))).completion_tokens
        rate = total / (time.perf_counter() - start)
        await engine.shutdown()
        return rate, cold

    return asyncio.run(run())


def swap_under_load(url: str, refs: list[str], swaps: int, tokens: int) -> tuple[int, int, list[float]]:
    """(requests completed, requests failed, swap seconds) with 4 clients streaming throughout."""
    stop, done, failed = threading.Event(), [0], []

    def stream():
        with httpx.Client(base_url=url, timeout=600) as client:
            while not stop.is_set():
                try:
                    with client.stream("POST", "/v1/chat/completions",
                                       json={"messages": PROMPT, "max_tokens": tokens // 4, "stream": True}) as r:
                        last = [line for line in r.iter_lines() if line][-1]
                    if r.status_code != 200 or last != "data: [DONE]":
                        failed.append(f"{r.status_code} {last[:80]}")
                    else:
                        done[0] += 1
                except Exception as err:
                    failed.append(repr(err))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    times = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(swaps):
            start = time.perf_counter()
            client.post("/api/finetune/switch-model", json={"model_path": refs[i % len(refs)]}).raise_for_status()
            times.append(time.perf_counter() - start)
            time.sleep(0.5)  # let requests start on each model before the next swap
    stop.set()
    for t in threads:
        t.join()
    return done[0], len(failed), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--swaps", type=int, default=20)
    args = parser.parse_args()
    from sage_ray.models import resolve_model

    demo_src = resolve_model("demo")  # converted once into the user's SAGE_HOME, then reused
    home = Path(tempfile.mkdtemp(prefix="sage_bench_"))
    os.environ["SAGE_HOME"] = str(home)
    import ray
    from ray import serve

    from sage_ray.registry import get_registry
    from sage_ray.serve.deploy import deploy_studio
    from sage_ray.serve.settings import StudioSettings
    from sage_ray.train.merge import merge_adapter

    (home / "models").mkdir(parents=True, exist_ok=True)
    demo = home / "models" / demo_src.name
    shutil.copytree(demo_src, demo)
    a, b = make_adapter(demo, home / "adapters" / "a", 1), make_adapter(demo, home / "adapters" / "b", 2)
    merged = home / "merged" / "demo-merged"
    merge_adapter(a, demo, merged)
    temp_dir = tempfile.mkdtemp(prefix="sgb", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
             _temp_dir=temp_dir, log_to_driver=False)
    try:
        registry = get_registry(home)
        for name, kind, path in (("adapter-a", "lora", a), ("adapter-b", "lora", b), ("demo-merged", "merged", merged)):
            ray.get(registry.upsert_artifact.remote({"name": name, "kind": kind, "path": str(path),
                                                     "base_model": str(demo)}))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy_studio(StudioSettings(sage_home=str(home), model=str(demo), engine="hf", ui=False), port=port)
        url = f"http://127.0.0.1:{port}"
        report(url, demo, merged, args)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def report(url: str, demo: Path, merged: Path, args) -> None:
    with httpx.Client(base_url=url, timeout=600) as client:
        generate(client, 8)  # warm-up
        switch = lambda ref: client.post("/api/finetune/switch-model", json={"model_path": ref}).raise_for_status()
        adapter_times = []
        for i in range(10):
            start = time.perf_counter()
            switch("adapter-a" if i % 2 == 0 else "adapter-b")
            adapter_times.append(time.perf_counter() - start)
        switch(demo.name)
        start = time.perf_counter()
        switch("demo-merged")
        full_swap = time.perf_counter() - start
        switch(demo.name)
    rate_inproc, cold = in_process_tokens_per_s(demo, merged, args.tokens)
    print(f"1. adapter switch via the Studio API (POST switch-model until it answers with the adapter active): "
          f"p50 {percentile(adapter_times, .5) * 1000:.0f} ms, p99 {percentile(adapter_times, .99) * 1000:.0f} ms")
    print(f"2. full model swap base -> merged: {full_swap:.2f} s; cold load of that model in-process "
          f"{cold:.2f} s; ratio {full_swap / cold:.2f}x")
    done, failed, times = swap_under_load(url, ["demo-merged", demo.name, "adapter-a"], args.swaps, args.tokens)
    print(f"3. {args.swaps} swaps under 4 streaming clients: {done} requests completed, {failed} failed; "
          f"swap p50 {statistics.median(times):.2f} s")
    rates = {c: throughput(url, c, args.tokens) for c in (1, 4, 8)}
    print("4. generation through HTTP: " + ", ".join(f"concurrency {c}: {r:.1f} tokens/s" for c, r in rates.items())
          + f"; 8 vs 1: {rates[8] / rates[1]:.2f}x")
    print(f"5. concurrency 1: HTTP {rates[1]:.1f} tokens/s vs in-process engine {rate_inproc:.1f} tokens/s: "
          f"HTTP overhead {(rate_inproc / rates[1] - 1) * 100:.1f}%")
    print(json.dumps({"adapter_switch_p50_ms": percentile(adapter_times, .5) * 1000,
                      "full_swap_vs_cold": full_swap / cold, "failed_during_swaps": failed,
                      "tokens_per_s": rates, "http_overhead_pct": (rate_inproc / rates[1] - 1) * 100}))


if __name__ == "__main__":
    main()
