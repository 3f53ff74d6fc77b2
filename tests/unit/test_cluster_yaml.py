"""cluster.yaml: valid for Ray's own cluster launcher, and true to sage-ray's conventions
(placement resources per GPU, sage-ray installed everywhere, shared storage, token auth,
nothing exposed to the internet, shell commands that parse)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"

# GPUs per instance and GPU memory (GB) of the instance types the comments suggest; a type
# listed here must advertise that many GPUs, so a changed InstanceType cannot silently
# keep the old counts.
GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.12xlarge": 4,
        "g5.24xlarge": 4, "g5.48xlarge": 8, "g6.xlarge": 1, "g6.2xlarge": 1, "g6.12xlarge": 4,
        "g6e.xlarge": 1, "g6e.2xlarge": 1, "g6e.4xlarge": 1, "g6e.12xlarge": 4, "g6e.48xlarge": 8,
        "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8}
GPU_MEMORY_GB = {"g5": 24, "g6": 24, "g6e": 48, "p4d": 40, "p4de": 80, "p5": 80}
ROLE_RESOURCE = {"gpu_serve": "sage_serve", "gpu_train": "sage_train"}
OPEN_TO_ALL = {"0.0.0.0/0", "::/0"}


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key) or []]


def test_ray_launcher_accepts_it(config: dict):
    """What `ray up` does before it talks to AWS: fill defaults, then Ray's schema checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", *ROLE_RESOURCE}


def test_head_has_no_gpu_and_hosts_the_studio(config: dict):
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert head["node_config"]["InstanceType"].split(".")[0] not in GPU_MEMORY_GB
    assert head["resources"].get("sage_studio") == 1


@pytest.mark.parametrize("node_type, memory_range", [("gpu_serve", (16, 32)), ("gpu_train", (40, 80))])
def test_gpu_groups_pin_work_by_resource(config: dict, node_type: str, memory_range: tuple[int, int]):
    group = config["available_node_types"][node_type]
    instance = group["node_config"]["InstanceType"]
    gpus = group["resources"]["GPU"]
    custom = {k: v for k, v in group["resources"].items() if k.startswith("sage_")}
    assert custom == {ROLE_RESOURCE[node_type]: gpus}, "one placement unit per GPU, for this role only"
    if instance in GPUS:
        assert gpus == GPUS[instance], f"{instance} has {GPUS[instance]} GPUs; set GPU and {ROLE_RESOURCE[node_type]}"
    low, high = memory_range
    assert low <= GPU_MEMORY_GB[instance.split(".")[0]] <= high
    assert group["labels"]["sage-role"] in node_type
    assert 0 <= group["min_workers"] <= group["max_workers"]


def test_autoscaling_bounds_let_every_group_reach_its_maximum(config: dict):
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers)
    assert config["idle_timeout_minutes"] > 0


def test_every_node_installs_sage_ray_from_the_mounted_checkout(config: dict):
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        if remote.startswith("~/sage-ray/"):
            assert (REPO / local).exists(), f"file_mounts copies {local}, which is not in the repository"
    assert {"~/sage-ray/pyproject.toml", "~/sage-ray/sage_ray"} <= set(mounts)
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert any('"$HOME/sage-ray[vllm]"' in c for c in installs)
    assert any("boto3" in c for c in config["head_setup_commands"])  # the autoscaler launches EC2 with it


def test_nothing_is_exposed_to_the_internet(config: dict):
    rules = config["provider"]["security_group"]["IpPermissions"]
    for rule in rules:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        assert not cidrs & OPEN_TO_ALL, f"rule {rule} opens the cluster to the internet"
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        assert 8000 not in ports and 8265 not in ports, "reach 8000/8265 through SSH tunnels, not rules"
    assert not any("0.0.0.0" in c for c in all_commands(config))
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_token_auth_on_every_node(config: dict):
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    env_file = config["setup_commands"][0]
    assert "cat > ~/sage-env.sh" in env_file and "export RAY_AUTH_MODE=token" in env_file
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert cmd.strip().startswith("source ~/sage-env.sh")


def test_shared_storage_mounted_and_registry_kept_local(config: dict):
    setup = "\n".join(config["setup_commands"])
    assert "mount -t nfs4" in setup and "/mnt/sage-efs" in setup
    for folder in ("studio_finetune", "models", "finetune_output"):
        assert folder in setup
    # SAGE_HOME stays on local disk (~/.sage): its registry.db must not be on NFS.
    assert "SAGE_HOME" not in setup


def test_header_tells_how_to_reach_the_ports_and_what_to_edit():
    text = CLUSTER_YAML.read_text()
    header = text.split("cluster_name:")[0]
    for needed in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray attach cluster.yaml -p 8000",
                   "ray get-auth-token --generate", "8265", "8000"):
        assert needed in header
    assert text.count("EDIT") >= 6


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_commands_are_valid_bash(config: dict):
    for cmd in all_commands(config):
        # as the launcher runs them: `bash --login -c -i "source ~/.bashrc; ... && (cmd)"`
        result = subprocess.run(["bash", "-n", "-c", f"true && ({cmd})"], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r}: {result.stderr}"


def test_the_queue_sees_what_the_autoscaler_can_start(config: dict, tmp_path: Path, monkeypatch):
    """Its GPU groups start at 0 nodes: the job queue and the GPU choice read their ceiling from
    the launcher config the head's autoscaler runs with (its --autoscaling-config), here a
    process started with this file, or from the file SAGE_AUTOSCALING_CONFIG names."""
    import subprocess
    import sys

    from sage_ray.placement import AUTOSCALING_CONFIG_ENV, autoscaler_ceiling, ceiling_of_launcher_config

    types = config["available_node_types"]
    ceiling = ceiling_of_launcher_config(config)
    assert ceiling["sage_train"] == types["gpu_train"]["max_workers"]
    assert ceiling["sage_serve"] == types["gpu_serve"]["max_workers"]
    assert ceiling["GPU"] == types["gpu_train"]["max_workers"] + types["gpu_serve"]["max_workers"]
    assert ceiling["sage_studio"] == 1  # the head itself
    monkeypatch.delenv(AUTOSCALING_CONFIG_ENV, raising=False)
    assert autoscaler_ceiling() is None  # no autoscaler here: the nodes there are all there will be

    monitor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                f"--autoscaling-config={CLUSTER_YAML}"])
    try:
        assert autoscaler_ceiling() == ceiling
    finally:
        monitor.kill()
        monitor.wait()
    monkeypatch.setenv(AUTOSCALING_CONFIG_ENV, str(CLUSTER_YAML))
    assert autoscaler_ceiling() == ceiling
    monkeypatch.setenv(AUTOSCALING_CONFIG_ENV, str(tmp_path / "absent.yaml"))
    assert autoscaler_ceiling() is None
