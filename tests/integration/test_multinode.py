"""Scale-out on a real multi-node Ray cluster: node groups by custom resources, in one machine.

`ray.cluster_utils.Cluster` starts a head ({"sage_studio": 1}: registry, Serve's controller and
proxy), a "train" node ({"sage_train": 2}, 2 CPUs) and a "serve" node ({"sage_serve": 1} plus a
GPU-like {"gpu_slot": 1} for the sharing policy). This module starts and stops its own
cluster (not the session's), with auth disabled and its own short temp dir. Models go
between nodes through SAGE_STORAGE on a local S3 server (moto's), as between machines that
share no disk.

The fine-tunes run through `finetune(cfg)` from this driver, not Ray Jobs: a cluster_utils
head has no job agent set up for `ray job submit` on free ports, and placement is decided by
the workers' resource requests either way (the job path only adds a driver process).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.ray_cluster import free_port
from tests.s3_storage import use_s3_storage

pytestmark = pytest.mark.ray
APP = "studio"


def node_with(resource: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource))


def actor_nodes(class_part: str) -> list[str]:
    """Node ids of every actor (alive or dead) whose class name contains `class_part`."""
    from ray._private import state

    return [a["Address"]["NodeID"] for a in state.actors().values() if class_part in a.get("ActorClassName", "")]


@pytest.fixture(scope="module")
def multinode(tmp_path_factory: pytest.TempPathFactory, s3_server: str):
    import ray

    home = tmp_path_factory.mktemp("sage_home_multinode")
    temp_dir = tempfile.mkdtemp(prefix="srmn_", dir="/tmp")  # short: socket paths are length-limited
    # this process may be joined to the session's cluster (tests/conftest.py): leave it for the
    # module and join it again after, for the tests that follow
    session = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    ray.shutdown()
    try:
        yield from _multinode_cluster(home, temp_dir, s3_server)
    finally:
        if session:
            ray.init(address=session, log_to_driver=False)


def _multinode_cluster(home, temp_dir, s3_server):
    import ray
    from ray.cluster_utils import Cluster

    from sage_ray.registry import get_registry

    with pytest.MonkeyPatch.context() as env:
        # cluster_utils records its address where `ray.init("auto")` and `sage studio start` look
        # for the machine's cluster: this one is private to the test, so it records nothing
        env.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.setenv("SAGE_HOME", str(home))
        env.setenv("SAGE_TRAIN_RESOURCES", json.dumps({"sage_train": 1}))
        env.delenv("RAY_ADDRESS", raising=False)
        # nodes share this machine's disk, so SAGE_HOME alone would hide what another node lacks:
        # models travel through an S3 bucket as they do between machines without a shared disk
        s3 = use_s3_storage(env, s3_server, home)
        # No node_ip_address="127.0.0.1": ray.init maps a loopback address to the machine's IP,
        # where an in-process node's GCS bound to loopback does not answer.
        ports = {"temp_dir": temp_dir, "include_dashboard": True,
                 "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
                 "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()}
        # each node its own SAGE_HOME, as on separate machines: what one node wrote or was given
        # (an uploaded dataset, a cached model) is not in another's
        homes = {group: home.parent / f"{home.name}_{group}" for group in ("train", "serve")}
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=1, resources={"sage_studio": 1}, **ports)
            for cpus, resources, group in ((2, {"sage_train": 2}, "train"), (1, {"sage_serve": 1, "gpu_slot": 1}, "serve")):
                cluster.add_node(num_cpus=cpus, resources=resources, dashboard_agent_listen_port=free_port(),
                                 metrics_export_port=free_port(), env_vars={"SAGE_HOME": str(homes[group])})
            ray.init(address=cluster.address, log_to_driver=False)
            registry = get_registry(home)
            yield SimpleNamespace(home=home, homes=homes, registry=registry, head=node_with("sage_studio"),
                                  train=node_with("sage_train"), serve=node_with("sage_serve"), cluster=cluster,
                                  s3=s3)
        finally:
            _stop_serve()
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_serve() -> None:
    from ray import serve

    try:
        serve.shutdown()
    except Exception:  # nothing was deployed
        pass


def deploy(home: Path, port: int, **settings_values):
    from sage_ray.serve.deploy import deploy_studio
    from sage_ray.serve.settings import StudioSettings

    settings = StudioSettings(sage_home=str(home), model="tiny", engine="hf", ui=False, **settings_values)
    deploy_studio(settings, port=port, app_name=APP, timeout_s=240)
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)


def llm_replicas() -> list[dict]:
    from sage_ray.serve.deploy import serve_details

    app = serve_details()["applications"][APP]
    return [r for r in app["deployments"]["LLMServer"]["replicas"] if r["state"] == "RUNNING"]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_for_policy(registry, policy: str) -> None:
    """Until the restarted replica (new settings) has loaded its model and recorded its hold."""
    import ray

    def recorded():
        serving = ray.get(registry.get_serving.remote()) or {}
        return serving.get("state") == "active" and (serving.get("gpu") or {}).get("policy") == policy

    wait_for(recorded, 180, f"the LLM replica with gpu_policy {policy!r}")


def chat(client: httpx.Client) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                           "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def studio_port(multinode):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def test_train_on_train_node_serve_on_serve_node_and_recover(multinode, studio_port, chat_data):
    import ray

    from sage_ray import TrainConfig
    from sage_ray.train.trainer import finetune

    started = time.monotonic()
    data = multinode.home / "datasets" / "chat.json"  # uploaded on the head: only in its folders
    data.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(chat_data, data)
    cfg = TrainConfig(name="mn-train", model="tiny", data=str(data), max_steps=2, batch_size=2,
                      max_length=128, num_workers=2, cpus_per_worker=1, save_steps=50)
    result = finetune(cfg, log_to_driver=False)
    print(f"fine-tune on the train node, 2 workers: {time.monotonic() - started:.1f} s")
    assert result.meta["metrics"]["workers"] == 2
    assert set(actor_nodes("RayTrainWorker")) == {multinode.train}  # both workers, only there

    # the train node's log lines reach the head's train.log through the registry actor (the
    # nodes share this machine's disk, so here a marker line shows the route they take)
    log = result.paths.train_log.read_text()
    assert "step 2/2" in log
    # the dataset exists only in the head's folders: the train node's workers read the store's copy
    [read] = [line for line in log.splitlines() if " dataset " in line]
    assert f"{multinode.homes['train'] / 'cache'}/" in read, read

    def write_from_node(paths, home: str, line: str) -> bool:
        from sage_ray.train.tracking import TaskLog

        task_log = TaskLog.for_worker(paths, home)
        task_log(line)
        task_log.flush()
        return task_log.registry is not None  # True: sent through the registry actor

    remote = ray.remote(write_from_node)
    for node, resource, routed in ((multinode.train, "sage_train", True), (multinode.head, "sage_studio", False)):
        line = f"marker from node {node[:8]}"
        assert ray.get(remote.options(num_cpus=0, resources={resource: 0.01}).remote(
            result.paths, str(multinode.home), line)) is routed
        assert line in result.paths.train_log.read_text()

    # the registry, on the head, lists the adapter the train node wrote, with its shared copy
    assert actor_nodes("RegistryActor") == [multinode.head]
    artifacts = ray.get(multinode.registry.list_artifacts.remote(task_id="mn-train"))
    assert [a["kind"] for a in artifacts] == ["lora"]
    assert artifacts[0]["uri"] == f"s3://{multinode.s3.bucket}/sage/studio_finetune/mn-train/lora"
    shutil.rmtree(result.paths.lora)  # only the train node had it: the serve node must fetch it

    client = deploy(multinode.home, studio_port, llm_resources={"sage_serve": 1})
    [replica] = llm_replicas()
    assert replica["node_id"] == multinode.serve
    response = client.post("/api/finetune/switch-model", params={"model_path": "mn-train"})
    assert response.status_code == 200 and response.json()["message"] == "switched and active", response.text
    adapter = artifacts[0]["name"]
    assert chat(client)["model"] == adapter
    served = client.get("/api/finetune/current-model").json()
    assert Path(served["path"]).parent == multinode.homes["serve"] / "cache"  # fetched and verified on the serve node

    # the replica dies: Serve brings one back on the serving node group, with the declared model
    started = time.monotonic()
    ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"), no_restart=True)
    [again] = wait_for(lambda: [r for r in llm_replicas() if r["actor_name"] != replica["actor_name"]] or None,
                       180, "a new LLM replica")
    assert again["node_id"] == multinode.serve
    current = wait_for(lambda: (c := client.get("/api/finetune/current-model").json()).get("state") == "active"
                       and c, 120, "the new replica to serve")
    assert current["name"] == adapter and chat(client)["model"] == adapter
    assert current["path"] == served["path"]  # the new replica found it in the node's cache
    print(f"replica killed -> serving {adapter} again on the serve node: {time.monotonic() - started:.1f} s")


def test_gpu_policy_with_fractional_resources(multinode, studio_port, chat_data):
    """The chat model reserves half of the serve node's gpu_slot, so Ray alone would place a
    job asking for the other half next to it; the policy decides instead."""
    import ray

    from sage_ray import TrainConfig
    from sage_ray.train.trainer import finetune
    from sage_ray.placement import CHAT_HOLDS_GPU

    client = deploy(multinode.home, studio_port, llm_resources={"gpu_slot": 0.5}, gpu_policy="wait")
    wait_for_policy(multinode.registry, "wait")
    assert [r["node_id"] for r in llm_replicas()] == [multinode.serve]
    assert ray.available_resources().get("gpu_slot") == pytest.approx(0.5)
    ray.get(multinode.registry.create_job.remote("policy-wait", config={"num_workers": 1, "cpus_per_worker": 1}))
    need = {"CPU": 1.0, "gpu_slot": 0.5}
    driver = ray.get_runtime_context().get_job_id()
    answer = ray.get(multinode.registry.acquire_slot.remote("policy-wait", need, None, driver))
    assert not answer["granted"] and answer["detail"].startswith(CHAT_HOLDS_GPU), answer
    ray.get(multinode.registry.update_job.remote("policy-wait", status="cancelled"))

    # "release": a real fine-tune on the serve node's other half borrows the chat model's GPU
    client = deploy(multinode.home, studio_port, llm_resources={"gpu_slot": 0.5}, gpu_policy="release")
    wait_for_policy(multinode.registry, "release")
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:  # what the chat model recorded while the job ran
        while not done.is_set():
            gpu = (ray.get(multinode.registry.get_serving.remote()) or {}).get("gpu") or {}
            seen.update(gpu.get("lent_to") or [])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    os.environ["SAGE_TRAIN_RESOURCES"] = json.dumps({"gpu_slot": 0.5})  # restored by the module fixture
    try:
        result = finetune(TrainConfig(name="policy-release", model="tiny", data=str(chat_data), max_steps=1,
                                      batch_size=2, max_length=128, num_workers=1, cpus_per_worker=1),
                          log_to_driver=False)
    finally:
        done.set()
        watcher.join()
    assert result.meta["status"] == "completed"
    assert "borrowing the GPU of the chat model" in result.paths.train_log.read_text()
    assert seen == {"policy-release"}
    serving = ray.get(multinode.registry.get_serving.remote())
    assert serving["gpu"]["lent_to"] == [] and serving["state"] == "active" and serving["declared"] == "tiny"
    assert chat(client)["choices"][0]["message"]["content"] is not None

    # A replica that dies while its GPU is lent comes back still lent (a transformers model then
    # loads on CPU, not under the running fine-tune) and takes the GPU back when the job ends.
    # The borrower is a job record in the state a running fine-tune's has: all the replica reads.
    from sage_ray.serve.gpu_lending import borrow_gpu

    ray.get(multinode.registry.create_job.remote("loan-held", config={"num_workers": 1}))
    ray.get(multinode.registry.update_job.remote("loan-held", status="training"))
    borrow_gpu({"app": APP}, "loan-held")
    old = ray.get(multinode.registry.get_serving.remote())["gpu"]
    assert old["lent_to"] == ["loan-held"]
    [replica] = llm_replicas()
    ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"), no_restart=True)

    def new_replica_record() -> dict | None:
        serving = ray.get(multinode.registry.get_serving.remote()) or {}
        fresh = (serving.get("gpu") or {}).get("actor_id") not in (None, old["actor_id"])
        return serving if fresh and serving.get("state") == "active" else None

    serving = wait_for(new_replica_record, 180, "the restarted LLM replica to serve")
    assert serving["gpu"]["lent_to"] == ["loan-held"] and serving["declared"] == "tiny"
    assert chat(client)["choices"][0]["message"]["content"] is not None  # it answers meanwhile
    ray.get(multinode.registry.update_job.remote("loan-held", status="completed"))
    wait_for(lambda: (ray.get(multinode.registry.get_serving.remote())["gpu"]["lent_to"] == []), 60,
             "the replica to take its GPU back after the job ended")


def report_autoscaling_config(groups: dict[str, tuple[dict[str, float], int]]) -> None:
    """Tell the GCS what an autoscaler could start, as a running autoscaler reports it:
    {group: (resources of one node, max nodes)}; {} reports none."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, (resources, count) in groups.items():
        group = config.node_group_configs.add()
        group.name, group.max_count = name, count
        group.resources.update({key: int(value) for key, value in resources.items()})
    GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(config.SerializeToString())


def test_a_job_for_a_group_at_zero_nodes_starts_when_the_autoscaler_adds_one(multinode, chat_data):
    """cluster.yaml's GPU groups start with no node: their resources appear only once the
    autoscaler starts one, and it starts one only for work that asks. The queue counts what the
    autoscaler can add, so the job is let through and its workers' request waits in Ray; this
    test then adds the node in the autoscaler's place, and the job trains there."""
    import ray

    from sage_ray import TrainConfig
    from sage_ray.train.device import cluster_has_gpu
    from sage_ray.train.trainer import finetune

    assert not cluster_has_gpu()
    report_autoscaling_config({"head": ({"CPU": 1, "sage_studio": 1}, 1), "train": ({"CPU": 2, "sage_train": 2}, 1),
                               "serve": ({"CPU": 1, "sage_serve": 1, "gpu_slot": 1}, 1),
                               "burst": ({"CPU": 1, "GPU": 1, "sage_burst": 1}, 1)})
    outcome: dict = {}

    def run() -> None:
        try:  # use_gpu False: the "burst" node this test adds has no real GPU
            outcome["result"] = finetune(TrainConfig(name="burst", model="tiny", data=str(chat_data), max_steps=1,
                                                     batch_size=2, max_length=128, num_workers=1, cpus_per_worker=1,
                                                     use_gpu=False), log_to_driver=False)
        except BaseException as err:  # noqa: BLE001  # reported by the main thread
            outcome["error"] = err

    try:
        assert cluster_has_gpu()  # a GPU group the autoscaler can start counts as GPUs
        os.environ["SAGE_TRAIN_RESOURCES"] = json.dumps({"sage_burst": 1})  # restored by the module fixture
        driver = threading.Thread(target=run, daemon=True)
        driver.start()
        job = wait_for(lambda: (j := ray.get(multinode.registry.get_job.remote("burst"))) and j["status"] != "queued"
                       and j, 120, "the queue's answer")
        assert job["status"] == "preparing", job
        assert job["status_detail"] == "starting: the autoscaler adds nodes for 1 sage_burst"
        time.sleep(2)
        assert ray.get(multinode.registry.get_job.remote("burst"))["status"] == "preparing"  # no node, no training
        nodes_before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        multinode.cluster.add_node(num_cpus=1, resources={"sage_burst": 1}, dashboard_agent_listen_port=free_port(),
                                   metrics_export_port=free_port())
        driver.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"].meta["status"] == "completed"
        [burst] = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - nodes_before
        assert burst in actor_nodes("RayTrainWorker")
    finally:
        report_autoscaling_config({})
    assert not cluster_has_gpu()
