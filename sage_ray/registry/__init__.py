"""The registry: every model and fine-tune job, in one durable store shared by the CLI, the
Studio, the SDK and jobs sent with plain `ray job submit`.

`get_registry()` returns the cluster's one named, detached registry actor (Ray imported only
then); `RegistryStore` is the SQLite store behind it, usable without Ray; `discover` finds
finished fine-tunes and local base models on disk.
"""

from __future__ import annotations

from sage_ray.registry.actor import ACTOR_NAME, NAMESPACE, RegistryActor, RegistryMismatchError, get_registry
from sage_ray.registry.discovery import describe_task, discover, newest_checkpoint
from sage_ray.registry.store import (KINDS, STATUSES, TERMINAL, AlreadyExistsError, ArtifactRecord, InUseError,
                                     JobRecord, NotFoundError, RegistryError, RegistryStore, RegistryValueError)

__all__ = [
    "ACTOR_NAME", "NAMESPACE", "KINDS", "STATUSES", "TERMINAL",
    "RegistryActor", "RegistryStore", "get_registry", "discover", "describe_task", "newest_checkpoint",
    "ArtifactRecord", "JobRecord",
    "RegistryError", "NotFoundError", "AlreadyExistsError", "InUseError", "RegistryValueError",
    "RegistryMismatchError",
]
