"""A canary: the served model as a weighted pair. A share (`weight`) of the requests that name
no model goes to the canary, the rest to the served model; requests that name a model get it.

It is part of the LLM deployment's declared config ({"model": A, "canary": {"model": B,
"weight": 0.1}}), so every replica routes alike and a restarted one comes back with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sage_ray.errors import SageError


class CanaryError(SageError):
    """A canary the Studio cannot serve as asked (the message names the field)."""

    http_status = 400


@dataclass(frozen=True)
class Canary:
    model: str
    """The canary's reference (a registry name or folder), resolved like the served model's."""
    weight: float
    """The share of requests without an explicit model it answers, strictly between 0 and 1."""

    def __post_init__(self) -> None:
        if not 0 < self.weight < 1:
            raise CanaryError(f"field 'weight': the canary's share of requests must be between 0 and 1 "
                              f"(e.g. 0.1 for 10%), got {self.weight}; switch to {self.model!r} to serve it alone")

    @classmethod
    def from_config(cls, value: dict[str, Any] | None) -> "Canary | None":
        return cls(str(value["model"]), float(value["weight"])) if value else None

    def as_config(self) -> dict[str, Any]:
        return {"model": self.model, "weight": self.weight}


def canary_of(model: str | None, weight: float | None) -> Canary | None:
    """The canary a request asks for: both fields or neither."""
    if model is None and weight is None:
        return None
    if model is None or weight is None:
        missing = "canary" if model is None else "weight"
        raise CanaryError(f"field '{missing}': a canary needs both 'canary' (the model) and 'weight' (its share)")
    return Canary(model, weight)
