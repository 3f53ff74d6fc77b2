"""Placement: settings to Ray resources, and the queue's GPU-sharing policy (no Ray needed).

The policy is checked here against figures shaped like Ray's (per-node free resources with
fractional custom units); tests/integration/test_multinode.py checks it against a real
multi-node cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_ray import placement
from sage_ray.placement import CHAT_HOLDS_GPU, PlacementError
from sage_ray.registry.queue import SlotQueue, decide, worker_demand
from sage_ray.registry.store import RegistryStore

SERVE, TRAIN = "node-serve", "node-train"


def test_train_resources_from_the_environment():
    assert placement.train_resources({}) == {}
    assert placement.train_resources({"SAGE_TRAIN_RESOURCES": '{"sage_train": 1}'}) == {"sage_train": 1.0}
    with pytest.raises(PlacementError, match="not JSON"):
        placement.train_resources({"SAGE_TRAIN_RESOURCES": "sage_train=1"})
    with pytest.raises(PlacementError, match="CPU is set by cpus_per_worker"):
        placement.train_resources({"SAGE_TRAIN_RESOURCES": '{"CPU": 2}'})
    with pytest.raises(PlacementError, match=">= 0"):
        placement.parse_resources({"gpu_slot": -1}, "llm_resources")


def test_worker_request_and_job_demand():
    assert placement.per_worker(2, False) == {"CPU": 2.0}
    assert placement.per_worker(1, True, {"sage_train": 1}) == {"CPU": 1.0, "GPU": 1.0, "sage_train": 1}
    assert placement.per_worker(1, True, {"GPU": 0.5}) == {"CPU": 1.0, "GPU": 0.5}  # a share of one card
    assert placement.per_worker(1, False, {"GPU": 0.5}) == {"CPU": 1.0}  # a CPU run never holds a GPU
    demand = worker_demand({"num_workers": 2, "cpus_per_worker": 1}, {"sage_train": 1})
    assert demand == {"CPU": 2.0, "sage_train": 2.0}
    # the default (no groups, no GPU) is what it was
    assert worker_demand({"num_workers": 2, "cpus_per_worker": 1.5, "use_gpu": True}) == {"CPU": 3.0, "GPU": 2.0}


def test_studio_settings_pin_the_replica_and_check_the_policy():
    from sage_ray.serve.settings import StudioSettings

    settings = StudioSettings(llm_resources={"sage_serve": 1}, llm_num_gpus=0.5, gpu_policy="release")
    assert placement.llm_actor_options(settings.llm_num_cpus, settings.llm_num_gpus, settings.llm_resources) == {
        "num_cpus": 0, "num_gpus": 0.5, "resources": {"sage_serve": 1.0}}
    assert placement.held_resources(0.5, settings.llm_resources) == {"sage_serve": 1.0, "GPU": 0.5}
    default = StudioSettings()
    assert default.gpu_policy == "none" and default.llm_resources == {}
    assert placement.llm_actor_options(0, 0, {}) == {"num_cpus": 0, "num_gpus": 0}  # no resources key at all
    with pytest.raises(ValueError, match="needs the LLM replica to hold"):
        StudioSettings(gpu_policy="wait")


def hold(policy: str, resources: dict[str, float]) -> dict:
    return {"policy": policy, "resources": resources, "node_id": SERVE, "actor_id": "a1", "app": "studio"}


def check(need, hold_, per_node, total):
    available = {name: sum(node.get(name, 0.0) for node in per_node.values()) for name in total}
    return decide(need, ahead=0, running=0, limit=None, available=available, claimed={}, total=total,
                  hold=hold_, per_node=per_node)


def test_policy_wait_keeps_a_job_off_the_chat_models_gpu():
    # one node with one GPU-like unit; the replica reserves half, so Ray alone would place the job
    per_node = {SERVE: {"CPU": 2.0, "gpu_slot": 0.5}}
    total = {"CPU": 2.0, "gpu_slot": 1.0}
    need = {"CPU": 1.0, "gpu_slot": 0.5}
    assert check(need, None, per_node, total).granted  # no policy: Ray's accounting decides
    assert check(need, hold("none", {"gpu_slot": 0.5}), per_node, total).granted
    waiting = check(need, hold("wait", {"gpu_slot": 0.5}), per_node, total)
    assert not waiting.granted and waiting.detail.startswith(CHAT_HOLDS_GPU) and "'release'" in waiting.detail
    # a second node with its own free unit: the job goes there, the chat model is not in the way
    per_node[TRAIN] = {"CPU": 2.0, "gpu_slot": 1.0}
    assert check(need, hold("wait", {"gpu_slot": 0.5}), per_node, {"CPU": 4.0, "gpu_slot": 2.0}).granted


def test_policy_release_lends_the_gpu_when_ray_can_place_both():
    per_node = {SERVE: {"CPU": 2.0, "gpu_slot": 0.5}}
    total = {"CPU": 2.0, "gpu_slot": 1.0}
    lent = check({"CPU": 1.0, "gpu_slot": 0.5}, hold("release", {"gpu_slot": 0.5}), per_node, total)
    assert lent.granted and lent.borrow["app"] == "studio" and "borrowing the GPU" in lent.detail
    # the replica reserves the whole unit: Ray cannot place the job, so nothing can be lent
    full = check({"CPU": 1.0, "gpu_slot": 1.0}, hold("release", {"gpu_slot": 1.0}),
                 {SERVE: {"CPU": 2.0, "gpu_slot": 0.0}}, total)
    assert not full.granted and full.detail.startswith(CHAT_HOLDS_GPU) and "llm_num_gpus 0.5" in full.detail
    # a CPU-only job never contends with the chat model
    assert check({"CPU": 1.0}, hold("wait", {"gpu_slot": 0.5}), per_node, total).granted


def test_slot_queue_reads_the_hold_of_a_live_replica(tmp_path: Path):
    store = RegistryStore(tmp_path / "registry.db")
    store.create_job("job", config={})
    per_node = {SERVE: {"CPU": 2.0, "gpu_slot": 0.5}}
    alive = {"a1": True}
    slots = SlotQueue(lambda: ({"CPU": 2.0, "gpu_slot": 0.5}, {"CPU": 2.0, "gpu_slot": 1.0}, {"d"}),
                      node_state=lambda: per_node, actor_alive=lambda actor: alive.get(actor, False))
    need = {"CPU": 1.0, "gpu_slot": 0.5}
    store.set_serving({"state": "active", "gpu": hold("wait", {"gpu_slot": 0.5})})
    answer = slots.acquire(store, "job", need, None, "d")
    assert not answer["granted"] and store.get_job("job")["status_detail"].startswith(CHAT_HOLDS_GPU)
    alive["a1"] = False  # the Studio stopped: its last record no longer holds anything
    answer = slots.acquire(store, "job", need, None, "d")
    assert answer["granted"] and answer["borrow"] is None
