"""Every environment variable sage-ray reads, in one table, with where its value must travel.

Ray jobs, training workers and Serve replicas do not inherit the submitting shell's
environment, so a setting the user made there reaches them only when it is forwarded:
`forwarded("jobs")` is what a fine-tune's job driver gets (it reads the registry, the queue
limit and the dataset), `forwarded("everywhere")` what workers and replicas get as well (shared
storage). Secrets (AWS keys, the API key) are never forwarded: a runtime_env is readable on
the dashboard. A unit test checks that every SAGE_ name in the code is in this table and in the
README.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

Reach = Literal["here", "jobs", "everywhere"]


@dataclass(frozen=True)
class EnvVar:
    name: str
    meaning: str
    reach: Reach = "here"
    """"here": read by the process it is set for; "jobs": forwarded to fine-tune jobs;
    "everywhere": forwarded to jobs, training workers and Serve replicas."""


TABLE: tuple[EnvVar, ...] = (
    EnvVar("SAGE_HOME", "where models, tasks, datasets and registry.db live (default ~/.sage)", "jobs"),
    EnvVar("SAGE_MAX_CONCURRENT_JOBS", "fine-tunes that may run at once (default: as many as fit)", "jobs"),
    EnvVar("SAGE_TRAIN_RESOURCES", 'extra Ray resources per training worker, JSON (e.g. {"sage_train": 1})', "jobs"),
    EnvVar("SAGE_MAX_DATASET_MB", "largest dataset file accepted (default 512)", "jobs"),
    EnvVar("SAGE_STORAGE", "shared artifact store: s3://bucket/prefix or a mounted folder", "everywhere"),
    EnvVar("SAGE_S3_ENDPOINT", "S3-compatible endpoint URL (MinIO, R2...)", "everywhere"),
    EnvVar("SAGE_CACHE_MAX_BYTES", "size bound of the local cache of shared models", "everywhere"),
    EnvVar("AWS_REGION", "the S3 region", "everywhere"),
    EnvVar("AWS_DEFAULT_REGION", "the S3 region, when AWS_REGION is unset", "everywhere"),
    EnvVar("AWS_PROFILE", "the AWS profile holding the S3 credentials", "everywhere"),
    EnvVar("AWS_SHARED_CREDENTIALS_FILE", "a credentials file present on every node", "everywhere"),
    EnvVar("AWS_CONFIG_FILE", "an AWS config file present on every node", "everywhere"),
    EnvVar("AWS_EC2_METADATA_DISABLED", "skip the EC2 instance-role lookup (off AWS)", "everywhere"),
    EnvVar("SAGE_AUTOSCALING_CONFIG", "the autoscaler's launcher config, when the head cannot find it"),
    EnvVar("SAGE_STUDIO_URL", "the Studio the SDK and `sage chat` talk to (default http://127.0.0.1:8000)"),
    EnvVar("SAGE_STUDIO_API_KEY", "the Studio's API key (server: required from clients; SDK: sent)"),
    EnvVar("SAGE_STUDIO_LLM_MODEL", "the model `serve run apps.studio:app` serves first"),
    EnvVar("SAGE_STUDIO_LLM_ENGINE", "the serving engine: auto, hf or vllm"),
    EnvVar("SAGE_STUDIO_LLM_GPU_MEMORY", "vLLM's gpu_memory_utilization (fraction of the GPU)"),
    EnvVar("SAGE_STUDIO_ALLOWED_ROOTS", "extra folders (os.pathsep-separated) the Studio may serve from"),
    EnvVar("SAGE_STUDIO_ALLOW_HUB", "1|0: a fine-tune asked for through the Studio may name a Hub model "
           "(default: 1 while the Studio answers loopback hosts only)"),
    EnvVar("SAGE_CHAT_BACKEND", "`sage chat`'s default --backend"),
    EnvVar("SAGE_CHAT_FINETUNE_MODEL", "`sage chat`'s default --finetune-model"),
    EnvVar("RAY_JOB_CONFIG_JSON_ENV_VAR", "set by Ray Jobs in a job's driver: its submission id"),
    EnvVar("RAY_OVERRIDE_DASHBOARD_URL", "the dashboard URL to show when Ray's own is not reachable"),
    EnvVar("RAY_ADDRESS", "the Ray cluster to use (default: a running local one, else a new one)"),
    EnvVar("OPENAI_API_KEY", "the API key `sage chat --base-url` sends to an OpenAI-style server"),
)
VARS = {var.name: var for var in TABLE}


def value(name: str, default: str | None = None) -> str | None:
    """The variable's value, stripped; `default` when unset or empty. Only names in TABLE."""
    if name not in VARS:
        raise KeyError(f"{name} is not in sage_ray.env.TABLE: add it there with its meaning and reach")
    raw = os.environ.get(name, "").strip()
    return raw or default


def forwarded(scope: Literal["jobs", "everywhere"]) -> dict[str, str]:
    """This process's settings that must reach a job (`"jobs"`, which includes the "everywhere"
    ones) or every remote process (`"everywhere"`), for a runtime_env's env_vars."""
    reaches = {"jobs": ("jobs", "everywhere"), "everywhere": ("everywhere",)}[scope]
    return {var.name: os.environ[var.name] for var in TABLE if var.reach in reaches and value(var.name)}
