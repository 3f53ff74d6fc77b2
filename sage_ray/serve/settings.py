"""StudioSettings: how the Studio app is built and served, from args, YAML or the environment.

One pydantic model feeds `serve run configs/studio.yaml` (its `args:`), `serve run
apps.studio:app` (the environment) and `sage studio start` (its flags). The settings travel
to the replicas inside the app's arguments, not through their environment, because Serve's
replicas are started by its controller and do not inherit the shell's variables.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sage_ray import env
from sage_ray.paths import sage_home
from sage_ray.serve.guard import LOOPBACK_HOSTS

EngineName = Literal["auto", "hf", "vllm"]
APP_NAME = "studio"
LLM_DEPLOYMENT = "LLMServer"
INGRESS_DEPLOYMENT = "StudioIngress"
DEFAULT_MODEL = "demo"
DEFAULT_GPU_MEMORY = 0.85


SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~50 ms and 16 MiB per guess: the stored hash resists brute force
_verified: dict[tuple[str, str], bool] = {}  # (stored hash, SHA-256 of a token) -> True, this process only


def hash_key(key: str, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash of `key`, as `scrypt$n$r$p$salt$hash` (hex)."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_key(token: str, stored: str) -> bool:
    """`token` against a hash_key() value, in constant time. A key already verified in this process
    is remembered by its SHA-256 (in memory only), so only the first request of a client pays scrypt."""
    seen = (stored, hashlib.sha256(token.encode()).hexdigest())
    if seen in _verified:
        return True
    try:
        scheme, n, r, p, salt, _digest = stored.split("$")
        expected = hash_key(token, bytes.fromhex(salt), int(n), int(r), int(p))
    except ValueError:  # not a hash this version wrote: no token matches it
        return False
    ok = scheme == "scrypt" and hmac.compare_digest(expected, stored)
    if ok and len(_verified) < 256:
        _verified[seen] = True
    return ok


class StudioSettings(BaseModel):
    """Everything the Studio's two deployments need to know at start."""

    model_config = ConfigDict(extra="forbid")

    sage_home: str = Field(default_factory=lambda: str(sage_home()),
                           description="Where models, fine-tunes and the registry live.")
    model: str = Field(DEFAULT_MODEL, description="The model served at start: a registry name, task id, "
                                                  "path, 'demo' (SmolLM2-135M-Instruct) or 'tiny'.")
    engine: EngineName = Field("auto", description="auto = vLLM with a GPU and vllm installed, else transformers.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description=f"Share of GPU memory vLLM may take (SAGE_STUDIO_LLM_GPU_MEMORY; default "
                                      f"{DEFAULT_GPU_MEMORY}). Not for vLLM on CPU, whose KV cache takes "
                                      "VLLM_CPU_KVCACHE_SPACE GiB of RAM: refused there.")
    max_loaded_models: int = Field(2, ge=1, description="Full models one LLM replica keeps loaded (the active one "
                                                        "plus others asked for by name, e.g. side-by-side chat). "
                                                        "1 = a swap unloads first and requests wait for the new model.")
    llm_num_cpus: float = Field(0, ge=0, description="CPUs Ray reserves for the LLM replica. 0 on a laptop so that "
                                                     "fine-tunes get every core; the engine still uses them all.")
    llm_threads: int | None = Field(None, ge=1, description="CPU threads of the transformers engine; default: "
                                                          "half the node's cores when llm_num_cpus is 0 (the rest "
                                                          "stay with fine-tunes), else llm_num_cpus.")
    llm_num_gpus: float = Field(0, ge=0, description="GPUs for the LLM replica (1 for vLLM on a GPU node).")
    llm_replicas: int = Field(1, ge=1, description="LLM replicas; a switch reconfigures each in place.")
    api_key: str | None = Field(None, description="When set, every request needs `Authorization: Bearer <key>` "
                                                  "(SAGE_STUDIO_API_KEY). Kept only as a salted scrypt hash: "
                                                  "the Serve config, readable on the dashboard, never holds it.")
    api_key_hash: str | None = Field(None, description="scrypt$n$r$p$salt$hash of the API key; set from api_key.")
    allowed_roots: list[str] = Field(default_factory=list,
                                     description="Folders besides SAGE_HOME from which models may be served "
                                                 "by path (SAGE_STUDIO_ALLOWED_ROOTS, ':'-separated).")
    max_upload_mb: float = Field(50, gt=0, description="Largest dataset upload accepted (counted as it streams).")
    max_body_mb: float = Field(4, gt=0, description="Largest body of any other request (JSON routes, chat).")
    max_prompt_chars: int = Field(200_000, gt=0, description="Longest prompt (all messages' text) a chat may "
                                                             "send; checked before tokenizing, so a huge one "
                                                             "gets 400 and never stalls the others.")
    allowed_hosts: list[str] = Field(["127.0.0.1", "localhost", "::1"],
                                     description="Host names the Studio answers to (DNS-rebinding guard); "
                                                 "'*' for any (set by `sage studio start --host` off loopback).")
    allow_hub: bool | None = Field(None, description="Whether a fine-tune asked for through the API or the UI may "
                                                     "name a Hugging Face Hub id (SAGE_STUDIO_ALLOW_HUB=1|0), "
                                                     "downloaded by the fine-tune's job, never by the ingress. "
                                                     "Default: yes while the Studio answers loopback hosts only, "
                                                     "no once it is reachable from the network.")
    ui: bool = Field(True, description="Mount the Gradio web UI at /.")

    @model_validator(mode="after")
    def _hash_api_key(self) -> "StudioSettings":
        if self.api_key:
            self.api_key_hash, self.api_key = hash_key(self.api_key), None
        return self

    def hub_allowed(self) -> bool:
        """Whether a request may name a Hub model: as set, else only on a loopback-only Studio."""
        if self.allow_hub is not None:
            return self.allow_hub
        return all(host in LOOPBACK_HOSTS for host in self.allowed_hosts)

    def check_key(self, token: str | None) -> bool:
        """True when no key is required, or `token` is the key (constant-time comparison)."""
        return not self.api_key_hash or verify_key(token or "", self.api_key_hash)

    @field_validator("sage_home")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return str(Path(value).expanduser().absolute())

    @classmethod
    def from_env(cls, **overrides: Any) -> "StudioSettings":
        """Defaults, then SAGE_* environment variables, then explicit values."""
        values: dict[str, Any] = {}
        for key, var in (("model", "SAGE_STUDIO_LLM_MODEL"), ("engine", "SAGE_STUDIO_LLM_ENGINE"),
                         ("gpu_memory_utilization", "SAGE_STUDIO_LLM_GPU_MEMORY"),
                         ("api_key", "SAGE_STUDIO_API_KEY"), ("allow_hub", "SAGE_STUDIO_ALLOW_HUB")):
            if env.value(var):
                values[key] = env.value(var)
        if env.value("SAGE_STUDIO_ALLOWED_ROOTS"):
            values["allowed_roots"] = [p for p in env.value("SAGE_STUDIO_ALLOWED_ROOTS").split(os.pathsep) if p]
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def llm_user_config(self, model: str | None = None) -> dict[str, Any]:
        """The LLMServer's declared state: what a config deploy changes to hot-swap."""
        return {"model": model or self.model, "gpu_memory_utilization": self.gpu_memory_utilization}

    def roots(self) -> list[Path]:
        """Folders a model path may come from: SAGE_HOME and the configured extra roots."""
        return [Path(self.sage_home), *(Path(r).expanduser().absolute() for r in self.allowed_roots)]

    # ---- placement (see sage_ray.placement) ------------------------------------------------
    llm_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each LLM replica asks for, to pin it to a node "
                                          "group: {'sage_serve': 1} puts it on the serving nodes of cluster.yaml.")
    gpu_policy: Literal["none", "wait", "release"] = Field(
        "none", description="When a fine-tune needs the GPU the chat model holds: 'none' lets Ray's accounting "
                            "decide, 'wait' keeps the job queued until the chat model lets go, 'release' makes the "
                            "chat model leave the GPU for the job's duration and take it back after.")

    @field_validator("llm_resources", mode="before")
    @classmethod
    def _resources(cls, value: Any) -> dict[str, float]:
        from sage_ray.placement import parse_resources

        return parse_resources(value, "llm_resources")

    @model_validator(mode="after")
    def _policy_has_a_gpu(self) -> "StudioSettings":
        if self.gpu_policy != "none" and self.llm_num_gpus <= 0 and not any(self.llm_resources.values()):
            raise ValueError(f"gpu_policy {self.gpu_policy!r} needs the LLM replica to hold what fine-tunes "
                             "contend for: set llm_num_gpus (e.g. 0.5) or llm_resources, or use gpu_policy 'none'")
        return self
