"""Where work runs: training and serving pinned to node groups by Ray resources, and the
policy for a GPU that a fine-tune and the chat model must share.

Node groups are custom resources the nodes advertise (cluster.yaml: `sage_train` on training
nodes, `sage_serve` on serving nodes). Training workers add `SAGE_TRAIN_RESOURCES` to their
request, the LLM replica adds the Studio's `llm_resources`, so each lands only where its group
is and the autoscaler starts a node of that type when such work waits. Unset (the default),
nothing is added: one machine, no groups, as before.

Sharing one GPU (a workstation): the LLM replica publishes what it holds (its "hold") in the
registry's serving record, and the job queue reads it. Ray's accounting alone cannot express
"the chat model has the card's memory": a replica that reserves all of the GPU blocks every
fine-tune with no explanation, and one that reserves a fraction lets a fine-tune start next to
it and run out of memory. The Studio's `gpu_policy` says what happens instead:
- "none": Ray's accounting decides (the default; right for nodes with a GPU each).
- "wait": a job that could only run on the chat model's GPU stays queued, saying so.
- "release": the job borrows it: the chat model leaves the GPU for the job's duration (the
  transformers engine moves to CPU and keeps answering; other engines unload) and takes it
  back when the job ends, with its declared model. Ray must be able to place both, so the
  replica and the workers each reserve a fraction (llm_num_gpus 0.5, SAGE_TRAIN_RESOURCES
  '{"GPU": 0.5}').
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from sage_ray import env
from sage_ray.errors import SageError

TRAIN_RESOURCES_ENV = "SAGE_TRAIN_RESOURCES"
AUTOSCALING_CONFIG_ENV = "SAGE_AUTOSCALING_CONFIG"
AUTOSCALING_CONFIG_FLAG = "--autoscaling-config="  # on the command line of the head's autoscaler
GpuPolicy = Literal["none", "wait", "release"]
CHAT_HOLDS_GPU = "waiting for GPU held by the chat model"
EPSILON = 1e-6


class PlacementError(SageError, ValueError):
    """A resource setting that cannot be used; the message names it and the fix."""


def parse_resources(raw: str | dict | None, source: str) -> dict[str, float]:
    """A {resource: amount} mapping from JSON text or a dict; amounts must be >= 0."""
    if raw is None or raw == "":
        return {}
    try:
        values = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except ValueError as err:
        raise PlacementError(f"{source}={raw!r} is not JSON; write e.g. '{{\"sage_train\": 1}}'") from err
    if not isinstance(values, dict):
        raise PlacementError(f"{source}: expected a mapping like {{\"sage_train\": 1}}, got {type(values).__name__}")
    out: dict[str, float] = {}
    for name, amount in values.items():
        if name == "CPU":
            raise PlacementError(f"{source}: CPU is set by cpus_per_worker / llm_num_cpus, not here; remove it")
        try:
            out[str(name)] = float(amount)
        except (TypeError, ValueError):
            amount = None
        if amount is None or out[str(name)] < 0:
            raise PlacementError(f"{source}: {name!r} needs a number >= 0, got {values[name]!r}")
    return out


def train_resources(environ: dict[str, str] | None = None) -> dict[str, float]:
    """Resources each training worker adds to its CPU/GPU request (SAGE_TRAIN_RESOURCES).

    "GPU" here replaces the default of one whole GPU per worker (a fraction, to share a card)."""
    environ = os.environ if environ is None else environ
    return parse_resources(environ.get(TRAIN_RESOURCES_ENV, "").strip() or None, TRAIN_RESOURCES_ENV)


def per_worker(cpus: float, use_gpu: bool, extra: dict[str, float] | None = None) -> dict[str, float]:
    """One training worker's Ray request: its CPUs, one GPU when it trains on GPUs, and `extra`."""
    resources = {"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})}
    for name, amount in (extra or {}).items():
        if name == "GPU" and not use_gpu:
            continue  # a CPU run never reserves a GPU, even when the environment names a share
        resources[name] = amount
    return resources


def llm_actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict[str, Any]:
    """The LLM replica's `ray_actor_options`: its CPUs, GPUs and node-group resources."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        options["resources"] = dict(resources)
    return options


def held_resources(num_gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """What a replica reserves beyond CPUs: the units a fine-tune could contend with it for."""
    held = {name: amount for name, amount in resources.items() if amount > 0}
    if num_gpus > 0:
        held["GPU"] = float(num_gpus)
    return held


def gpu_conflict(need: dict[str, float], hold: dict[str, Any] | None,
                 per_node_available: dict[str, dict[str, float]]) -> tuple[str | None, str | None]:
    """How the chat model's hold bears on a job needing `need` (in total over its workers).

    Returns (None, None) when it does not (no policy, or the job fits on other nodes), else
    ("wait", detail) to keep the job queued, or ("borrow", detail) to let it start by
    borrowing the chat model's GPU."""
    if not hold or hold.get("policy") in (None, "none"):
        return None, None
    node = hold.get("node_id")
    shared = [name for name in need if name in (hold.get("resources") or {})]
    elsewhere = {name: sum(avail.get(name, 0.0) for node_id, avail in per_node_available.items() if node_id != node)
                 for name in shared}
    contended = [name for name in shared if need[name] > elsewhere[name] + EPSILON]
    if not contended:
        return None, None
    if hold["policy"] == "wait":
        return "wait", (f"{CHAT_HOLDS_GPU} (gpu_policy 'wait'): the job needs "
                        f"{', '.join(contended)} on its node; it starts when the Studio stops serving there, "
                        "or set the Studio's gpu_policy to 'release' to lend it to fine-tunes")
    there = per_node_available.get(node, {})
    short = [name for name in contended if need[name] > elsewhere[name] + there.get(name, 0.0) + EPSILON]
    if short:
        return "wait", (f"{CHAT_HOLDS_GPU}: Ray counts all of its {', '.join(short)} as the chat model's, so "
                        "it cannot be lent; give the replica a share (llm_num_gpus 0.5) and the workers the "
                        f"rest ({TRAIN_RESOURCES_ENV}='{{\"GPU\": 0.5}}')")
    return "borrow", "borrowing the GPU of the chat model (gpu_policy 'release'); it takes it back after the job"


def autoscaler_ceiling() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may bring up, head included; None when
    the cluster does not autoscale (a local or `ray start` cluster: what is there is all).

    A node group at 0 nodes (cluster.yaml's GPU groups) shows none of its resources until
    something waits for them, so the queue and the device choice must count what it can add.
    Read from the config an autoscaler reported to the GCS (as Ray Data reads it), else from the
    launcher config the head's autoscaler runs with (`ray up` gives it ~/ray_bootstrap_config.yaml;
    this runs on the head: the registry and job drivers do), or the file SAGE_AUTOSCALING_CONFIG names."""
    from_gcs = _ceiling_from_gcs()
    if from_gcs:
        return from_gcs
    path = env.value(AUTOSCALING_CONFIG_ENV) or running_autoscaler_config()
    if not path:
        return None
    try:
        import yaml

        return ceiling_of_launcher_config(yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8")) or {})
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def running_autoscaler_config() -> str | None:
    """The launcher config of an autoscaler running on this machine (Ray's monitor process,
    started with --autoscaling-config=PATH), or None when none runs here."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        for part in proc.info["cmdline"] or ():
            if part.startswith(AUTOSCALING_CONFIG_FLAG):
                return part[len(AUTOSCALING_CONFIG_FLAG):]
    return None


def ceiling_of_launcher_config(config: dict[str, Any]) -> dict[str, float] | None:
    """Resources of every node a Ray cluster launcher config may run: each node type's
    `resources` times its max_workers (plus the head node itself)."""
    head, ceiling = config.get("head_node_type"), {}
    for name, node_type in (config.get("available_node_types") or {}).items():
        count = int(node_type.get("max_workers", 0)) + (1 if name == head else 0)
        for resource, amount in (node_type.get("resources") or {}).items():
            ceiling[resource] = ceiling.get(resource, 0.0) + float(amount) * count
    return ceiling or None


def _ceiling_from_gcs() -> dict[str, float] | None:
    from ray._private import state

    try:
        ceiling = state.state.get_max_resources_from_cluster_config()
    except Exception:  # not connected, or a GCS without the key: plan without it
        return None
    return {name: float(amount) for name, amount in ceiling.items()} if ceiling else None
