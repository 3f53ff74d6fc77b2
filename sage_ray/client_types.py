"""The SDK's answers as dataclasses: what the Studio's JSON says, with the whole object kept as `raw`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

TERMINAL = ("completed", "failed", "cancelled")


def _pick(cls, values: dict[str, Any]):
    """An instance of dataclass `cls` from a JSON object: known fields taken, the whole object kept as `raw`."""
    names = {f.name for f in fields(cls)} - {"raw"}
    return cls(**{k: v for k, v in values.items() if k in names}, raw=values)


@dataclass
class Job:
    """A fine-tune task as the Studio reports it."""

    task_id: str
    status: str
    progress: float = 0.0
    status_detail: str | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    error: str | None = None
    config: dict[str, Any] | None = None
    created_at: str | None = None
    finished_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        """True once the job has ended: completed, failed or cancelled."""
        return self.status in TERMINAL

    @property
    def method(self) -> str:
        """sft, dpo, orpo or kto."""
        return (self.config or {}).get("method", "sft")

    @property
    def metrics(self) -> dict[str, float]:
        """The latest preference metrics (rewards/accuracies, rewards/margins, ...); empty for sft."""
        history = self.raw.get("loss_history") or []
        return next((point[2] for point in reversed(history) if len(point) > 2), {})


@dataclass
class Model:
    """A model the Studio can serve: a base model, a LoRA adapter or a merged fine-tune."""

    name: str
    kind: str
    path: str
    base_model: str | None = None
    task_id: str | None = None
    group: str | None = None  # "base" or "finetuned"
    active: bool = False
    created_at: str | None = None
    size_bytes: int | None = None
    uri: str | None = None  # its shared copy (SAGE_STORAGE), fetched by nodes without `path`
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class CurrentModel:
    """What the LLM service serves now; `state` is active, loading, starting or "not serving"."""

    name: str
    state: str
    kind: str | None = None
    path: str | None = None
    base_model: str | None = None
    declared: str | None = None
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Upload:
    """A dataset the Studio accepted: where it keeps it (pass `path` as a job's `data`) and a preview."""

    path: str
    filename: str
    records: int
    format: str
    kind: str = "sft"
    """What the records train: "sft", "pairs" (for method dpo / orpo / kto) or "labelled" (kto)."""
    sha256: str | None = None
    preview: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
