"""vLLM's side of the engine protocol without vLLM: engine and sampling arguments, finish reasons.

Pure conversions (no vLLM import), so they are unit-tested on any machine; the engine that
uses them is sage_ray.serve.engines.vllm.
"""

from __future__ import annotations

import os

from sage_ray.serve.engines.base import EngineError, SamplingParams

GPU_MEMORY_ENV = "SAGE_STUDIO_LLM_GPU_MEMORY"
DEFAULT_GPU_MEMORY = 0.85
# On CPU vLLM takes its KV cache from this many GiB of RAM (else it checks
# gpu_memory_utilization as a share of all RAM against the free RAM, and refuses to start).
CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KV_CACHE_GB = 1
# The LoRA ranks vLLM's kernels are built for; max_lora_rank must be one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's finish reasons that end a reply normally; "abort" and "error" are failures, and
# "repetition" only comes from repetition_detection, which this engine never asks for.
FINISH_REASONS = {"stop": "stop", "length": "length"}


def resolve_gpu_memory(value: float | None = None) -> float:
    """The fraction of GPU memory vLLM may take: the option, else $SAGE_STUDIO_LLM_GPU_MEMORY, else 0.85."""
    raw = value if value is not None else os.environ.get(GPU_MEMORY_ENV, DEFAULT_GPU_MEMORY)
    try:
        fraction = float(raw)
    except ValueError:
        raise EngineError(f"{GPU_MEMORY_ENV}={raw!r} is not a number: set a fraction such as 0.85") from None
    if not 0 < fraction <= 1:
        raise EngineError(f"gpu_memory_utilization must be in (0, 1], got {fraction}: e.g. 0.85 for 85%")
    return fraction


def lora_rank_limit(rank: int) -> int:
    """The smallest rank vLLM supports that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise EngineError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): retrain with a smaller r")


def engine_args(model_path: str, *, gpu_memory: float, max_lora_rank: int, **extra) -> dict:
    """Keyword arguments for vllm's AsyncEngineArgs: LoRA on, the model folder's own tokenizer."""
    return {
        "model": model_path,
        "enable_lora": True,
        "max_lora_rank": lora_rank_limit(max_lora_rank),
        "gpu_memory_utilization": gpu_memory,
        **extra,
    }


def sampling_kwargs(params: SamplingParams, stop_token_ids: list[int]) -> dict:
    """Keyword arguments for vllm.SamplingParams with the same meaning as the hf engine's.

    The served artifact's end-of-turn ids go in stop_token_ids, which vLLM honours even with
    ignore_eos (that flag only skips the tokenizer's eos): so with ignore_eos none are passed.
    """
    return {
        "n": 1,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,  # 0 is greedy in vLLM too
        "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
        "stop": list(params.stop or []),
        "stop_token_ids": [] if params.ignore_eos else list(stop_token_ids),
        "seed": params.seed,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "logit_bias": dict(params.logit_bias) if params.logit_bias else None,
        # vLLM returns the sampled token's logprob plus this many top ones (0: the sampled one only),
        # from the raw distribution by default, as the hf engine reports them
        "logprobs": params.top_logprobs if params.logprobs else None,
        "structured_outputs": _structured(params.json_schema),
    }


def _structured(schema: dict | None):
    """vLLM's structured outputs for a JSON schema, compact JSON (no free whitespace: a weak model
    would fill the reply with it and never close the object, as the hf engine also prevents)."""
    if schema is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def openai_logprobs(completion, already: int, top: int, tokenizer, token_bytes) -> list[dict]:
    """OpenAI's logprobs entries for the tokens of vLLM's cumulative `completion` after the first
    `already`: {"token", "logprob", "bytes", "top_logprobs": [the `top` likeliest, by rank]}."""
    def item(token_id: int, value: float) -> dict:
        return {"token": tokenizer.decode([token_id]), "logprob": value, "bytes": list(token_bytes(token_id))}

    entries = []
    for token, candidates in zip(completion.token_ids[already:], (completion.logprobs or [])[already:]):
        entry = item(token, float(candidates[token].logprob))
        ranked = sorted((c.rank, t, c.logprob) for t, c in candidates.items() if c.rank is not None and c.rank <= top)
        entry["top_logprobs"] = [item(t, float(value)) for _rank, t, value in ranked[:top]]
        entries.append(entry)
    return entries


def finish_reason(reason: str | None) -> str:
    """vLLM's finish reason as the protocol's ("stop" | "length"); the others are EngineErrors."""
    if reason in FINISH_REASONS:
        return FINISH_REASONS[reason]
    if reason == "abort":
        raise EngineError("vLLM aborted the request (engine overloaded or shutting down); retry it")
    raise EngineError(f"vLLM ended the request with finish reason {reason!r} (an internal error on its side); "
                      "retry it, and see the replica's log if it repeats")
