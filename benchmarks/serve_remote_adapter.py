"""Time to serve a just-trained LoRA adapter on another node vs on the node that trained it.

Starts its own multi-node Ray cluster in this machine (`ray.cluster_utils.Cluster`: a head, a
"train" node {"sage_train"} and a "serve" node {"sage_serve"}) and a local S3-compatible
server (moto), fine-tunes a model for a few steps on the train node (Ray Train, placed by
SAGE_TRAIN_RESOURCES) with SAGE_STORAGE=s3://..., so training itself uploads the adapter
(what the registry then records as the artifact's URI). Then, on each
node, an actor placed by resources with the base model already loaded (as a serving replica
has it) measures, from one run:
  same node:    load the adapter from the local task folder + first token
  another node: fetch from s3:// into an empty cache (verified by the manifest) + load + first token

    python benchmarks/serve_remote_adapter.py [--model tiny|demo] [--steps 3]

Every node shares this machine's disk and network, so "fetch" measures sage_ray.storage's S3
path (HTTP, checksums, the cache's atomic rename) against a loopback server, not a real
network: a cloud object store adds its latency and bandwidth on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["RAY_AUTH_MODE"] = "disabled"
S3_ENV = {"AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
PROMPT = [{"role": "user", "content": "What is Ray Serve?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AdapterProbe:
    """A serving process on one node: the base model loaded, then one adapter timed end to end."""

    def __init__(self, base: str, threads: int):
        from sage_ray.serve.engines.hf import HFEngine

        self.base = base
        self.engine = HFEngine(device="cpu", threads=threads)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def start(self) -> float:
        from sage_ray.serve.engines.base import ModelSpec

        import peft  # noqa: F401  # a replica that served adapters has it imported: not part of a load

        started = time.perf_counter()
        asyncio.run(self.engine.start(ModelSpec(name="base", path=self.base, kind="base")))
        return time.perf_counter() - started

    def serve_adapter(self, name: str, source: str, cache_dir: str) -> dict[str, float]:
        """Seconds to fetch `source` (an s3:// URI; a local path costs nothing), load it, first token."""
        from sage_ray import storage
        from sage_ray.serve.engines.base import ModelSpec, SamplingParams

        t0 = time.perf_counter()
        local = storage.fetch(source, cache_dir=cache_dir) if storage.is_uri(source) else Path(source)
        t1 = time.perf_counter()

        async def load_and_first_token() -> float:
            await self.engine.load_adapter(ModelSpec(name=name, path=str(local), kind="lora", base_path=self.base))
            loaded = time.perf_counter()
            stream = self.engine.chat(PROMPT, adapter=name, params=SamplingParams(max_tokens=8, temperature=0))
            async for _delta in stream:
                break
            await stream.aclose()
            return loaded

        t2 = asyncio.run(load_and_first_token())
        t3 = time.perf_counter()
        return {"fetch": t1 - t0, "load": t2 - t1, "first_token": t3 - t2, "total": t3 - t0}


def start_s3(home: Path):
    """A moto S3 server and a bucket, with SAGE_STORAGE pointing there; returns the server."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # credentials by file, as on a cluster: sage-ray forwards the file's path to jobs, never keys
    credentials = home / "aws_credentials"
    credentials.write_text("[default]\naws_access_key_id = bench\naws_secret_access_key = bench\n")
    bucket = f"sage-bench-{os.urandom(3).hex()}"
    os.environ.update(S3_ENV, SAGE_S3_ENDPOINT=endpoint, AWS_SHARED_CREDENTIALS_FILE=str(credentials),
                      SAGE_STORAGE=f"s3://{bucket}/sage")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket=bucket)
    return server


def start_cluster(temp_dir: str):
    import ray
    from ray.cluster_utils import Cluster

    ray._private.utils.write_ray_address = lambda *args, **kwargs: None  # private cluster: record nothing
    cluster = Cluster()

    def ports() -> dict:  # every node its own agent ports: Ray's defaults clash with other clusters here
        return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()}

    cluster.add_node(num_cpus=1, temp_dir=temp_dir, include_dashboard=False, **ports())
    cluster.add_node(num_cpus=2, resources={"sage_train": 2}, **ports())
    cluster.add_node(num_cpus=2, resources={"sage_serve": 1}, **ports())
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def train(model: str, steps: int, home: Path):
    from sage_ray import TrainConfig
    from sage_ray.train.trainer import finetune
    from sage_ray.paths import TaskPaths

    data = Path(__file__).resolve().parents[1] / "sage_ray" / "quickstart" / "chat.json"
    os.environ["SAGE_TRAIN_RESOURCES"] = json.dumps({"sage_train": 1})
    started = time.perf_counter()
    result = finetune(TrainConfig(name="bench-remote", model=model, data=str(data), max_steps=steps, batch_size=2,
                                  max_length=256, num_workers=2, cpus_per_worker=1), log_to_driver=False)
    print(f"fine-tune on the train node (2 workers, {steps} steps): {time.perf_counter() - started:.1f} s")
    return result, TaskPaths(result.task_id)


def measure(args, home: Path) -> None:
    import ray

    from sage_ray import storage

    server = start_s3(home)
    try:
        result, paths = train(args.model, args.steps, home)
        base = result.meta["base_model_path"]
        uri = result.meta["lora_uri"]  # written by the training run's first worker
        print(f"adapter shared by the training run at {uri} ({result.meta['lora_bytes'] / 2**20:.1f} MiB)")
        env = {"env_vars": {**storage.forwarded_env(), "SAGE_HOME": str(home)}}
        probe = ray.remote(AdapterProbe)
        same = probe.options(num_cpus=1, runtime_env=env, resources={"sage_train": 1}).remote(base, args.threads)
        other = probe.options(num_cpus=1, runtime_env=env, resources={"sage_serve": 1}).remote(base, args.threads)
        nodes = ray.get([same.node.remote(), other.node.remote()])
        assert nodes[0] != nodes[1], "the two probes must run on different nodes"
        ray.get([same.start.remote(), other.start.remote()])  # a serving replica has its base loaded already
        cache = tempfile.mkdtemp(prefix="sage_bench_cache_")
        rows = {"same node (local folder)": ray.get(same.serve_adapter.remote("a-local", str(paths.lora), cache)),
                "another node (s3:// fetch)": ray.get(other.serve_adapter.remote("a-remote", uri, cache))}
        shutil.rmtree(cache, ignore_errors=True)
    finally:
        server.stop()
    print(f"\nserving the just-trained adapter of {args.model!r} (seconds, one run):")
    print(f"{'':28} {'fetch':>8} {'load':>8} {'1st token':>10} {'total':>8}")
    for label, row in rows.items():
        print(f"{label:28} {row['fetch']:8.3f} {row['load']:8.3f} {row['first_token']:10.3f} {row['total']:8.3f}")
    local, remote = rows.values()
    print(f"another node / same node: {remote['total'] / local['total']:.2f}x "
          f"(+{remote['total'] - local['total']:.3f} s, of which fetch {remote['fetch']:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="base model: tiny (random, fast) or demo (SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=3, help="training steps of the fine-tune")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each serving probe")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="sage_bench_home_"))
    os.environ["SAGE_HOME"] = str(home)
    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="srb_", dir="/tmp")
    cluster = start_cluster(temp_dir)
    try:
        measure(args, home)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
