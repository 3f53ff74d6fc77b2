"""`finetune(cfg)`: one fine-tune from a TrainConfig to a registered-ready task folder.

The driver validates everything it can before asking Ray for workers (dataset, model,
preset, memory estimate), runs the per-worker loop on a Ray Train TorchTrainer, then merges
if asked and writes finetune_meta.json last, so a task with a meta file is complete.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_ray import cluster, storage
from sage_ray.config import ConfigError, TrainConfig, dump_train_config
from sage_ray.data import load_dataset
from sage_ray.data.split import resolve_validation
from sage_ray.errors import SageError
from sage_ray.models import resolve_model
from sage_ray.paths import TaskPaths, sage_home
from sage_ray.placement import per_worker, train_resources
from sage_ray.presets import DeviceInfo, GiB, apply_preset, check_fits, read_model_config
from sage_ray.registry.queue import concurrency_limit, worker_demand
from sage_ray.serve.gpu_lending import borrow_gpu, return_gpu
from sage_ray.train.callbacks import write_log
from sage_ray.train.device import cluster_has_gpu, local_device
from sage_ray.train.merge import merge_adapter
from sage_ray.train.meta import build_meta, now_iso, write_json_atomic
from sage_ray.train.publish import checkpoint_location, local_adapter, publish_merged, run_result, share_dataset
from sage_ray.train.tracking import JobTracker
from sage_ray.registry.status import JobStatus


# Ray Train runs the loop in a secondary thread, which glibc gives its own malloc arena with
# small heaps: torch's large short-lived CPU tensors are then mapped, faulted in and unmapped
# every step (measured: ~20% fewer tokens/s than the same loop on a main thread). One arena,
# heap-served allocations up to 32 MiB and no trimming of the heap top remove the gap.
WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024**2),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024**3),
    "MALLOC_TOP_PAD_": str(512 * 1024**2),
}


class TrainingError(SageError, RuntimeError):
    """The training run failed; the message is the workers' error, the log has the rest."""


@dataclass
class FinetuneResult:
    task_id: str
    paths: TaskPaths
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        """The merged model when there is one, else the adapter."""
        return Path(self.meta["merged_path"] or self.meta["lora_path"])


def new_task_id(task: str) -> str:
    return f"{task}_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(2)}"


def name_task(cfg: TrainConfig) -> tuple[TrainConfig, TaskPaths]:
    """Give the task its id and an absolute dataset path; refuse to overwrite a finished task."""
    if not cfg.data:
        raise ConfigError("field 'data': no dataset given; pass --data FILE (JSON or JSONL)")
    cfg = cfg.model_copy(update={"name": cfg.name or new_task_id(cfg.task),
                                 "data": str(Path(cfg.data).expanduser().resolve()),
                                 "val_data": str(Path(cfg.val_data).expanduser().resolve()) if cfg.val_data else None})
    paths = TaskPaths(cfg.name)
    if paths.meta.exists():
        raise ConfigError(f"task {cfg.name!r} already completed in {paths.dir}; choose another --name or delete it")
    return cfg, paths


def worker_resources(cfg: TrainConfig) -> TrainConfig:
    """Pick GPU or CPU and the CPUs per worker: what the job asks the queue and Ray for."""
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_has_gpu()
    cpus = cfg.cpus_per_worker or (1 if use_gpu else max(1, group_cpus(train_resources()) // cfg.num_workers))
    return cfg.model_copy(update={"use_gpu": use_gpu, "cpus_per_worker": cpus})


def group_cpus(resources: dict[str, float]) -> int:
    """CPUs of the nodes training may use: those offering every resource in `resources` (the
    training node group), or the whole cluster when no group is set."""
    custom = [name for name in resources if name != "GPU"]
    if not custom:
        return cluster.cluster_cpus()
    from ray._private import state

    nodes = state.total_resources_per_node().values()
    return int(sum(node.get("CPU", 0) for node in nodes if all(node.get(name, 0) > 0 for name in custom))) or 1


def probe_device(cfg: TrainConfig) -> DeviceInfo:
    """The device a worker will get, from a Ray task asking for what one worker asks for (so it
    runs on the training node group, on a GPU share like the workers')."""
    import ray

    resources = per_worker(0, bool(cfg.use_gpu), train_resources())
    gpus = resources.pop("GPU", 0)
    resources.pop("CPU")
    task = ray.remote(local_device).options(num_cpus=0, num_gpus=gpus, resources=resources or None)
    return ray.get(task.remote(bool(cfg.use_gpu)))


def resolve_resources(cfg: TrainConfig, model_dir: Path):
    """Fill the preset for the device a worker gets, and check memory (after the slot is granted,
    and after a borrowed GPU was released: the probe then sees its memory free)."""
    cfg = worker_resources(cfg)
    device = probe_device(cfg)
    resolved = apply_preset(cfg, device)
    estimate = check_fits(read_model_config(model_dir), resolved, device)
    return resolved, device, estimate


def run_trainer(cfg: TrainConfig, paths: TaskPaths, model_dir: Path) -> dict[str, Any]:
    """Run the per-worker loop on Ray Train; re-using the task's run name resumes it."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sage_ray.train.loop import train_loop_per_worker

    resources = per_worker(cfg.cpus_per_worker, bool(cfg.use_gpu), train_resources())
    storage_path, storage_fs = checkpoint_location(paths)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": {**cfg.model_dump(mode="json"), "data": share_dataset(cfg.data),
                                      "val_data": share_dataset(cfg.val_data) if cfg.val_data else None},
                           "model_dir": str(model_dir),
                           "task_dir": str(paths.dir), "sage_home": str(sage_home())},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=bool(cfg.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=paths.checkpoints.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             worker_runtime_env={"env_vars": {**WORKER_ENV, **storage.forwarded_env()}}),
    )
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; keep its message
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise TrainingError(f"training failed: {cause}") from err
    return run_result(paths)


def finetune(cfg: TrainConfig, *, address: str | None = None, log_to_driver: bool = True) -> FinetuneResult:
    """Fine-tune `cfg.model` on `cfg.data` with LoRA on Ray Train; merge when `cfg.merge`.

    Joins the cluster at `address` / RAY_ADDRESS or starts a local one; `log_to_driver`
    False keeps the workers' output out of this process (it is in the task's train.log).
    The job's record in the registry follows the run; a failure keeps its error there.
    """
    cfg, paths = name_task(cfg)
    cluster.connect(address, log_to_driver=log_to_driver)
    tracker = JobTracker(cfg.name, sage_home())
    tracker.begin(cfg.model_dump(mode="json"), paths)
    try:
        return _run(cfg, paths, tracker)
    except BaseException as err:
        tracker.fail(err)
        raise


def _run(cfg: TrainConfig, paths: TaskPaths, tracker: JobTracker) -> FinetuneResult:
    records = len(load_dataset(cfg.data, method=cfg.method))  # a bad dataset fails here, before any worker starts
    if cfg.val_data:
        load_dataset(cfg.val_data, method=cfg.method)
    cfg, note = resolve_validation(cfg, records)
    write_log(paths.train_log, note)
    model_dir = resolve_model(cfg.model)
    cfg = worker_resources(cfg)
    tracker.update(config=cfg.model_dump(mode="json"))  # the queue reads the job's demand from it
    slot = tracker.wait_for_slot(worker_demand(cfg.model_dump(), train_resources()), concurrency_limit())
    borrowed = (slot or {}).get("borrow")
    if borrowed:  # granted on the chat model's GPU (gpu_policy "release"): it leaves the GPU first
        write_log(paths.train_log, f"borrowing the GPU of the chat model (app {borrowed['app']!r})")
        borrow_gpu(borrowed, cfg.name)
    try:
        return _train(cfg, paths, tracker, model_dir)
    finally:
        if borrowed:
            try:
                return_gpu(borrowed, cfg.name)
            except Exception as err:  # the replica takes it back by itself once this job has ended
                write_log(paths.train_log, f"could not hand the GPU back to the chat model now ({err}); "
                                           "it reclaims it at its next health check")


def _train(cfg: TrainConfig, paths: TaskPaths, tracker: JobTracker, model_dir: Path) -> FinetuneResult:
    cfg, device, estimate = resolve_resources(cfg, model_dir)
    paths.dir.mkdir(parents=True, exist_ok=True)
    started_at = now_iso()
    log = paths.train_log
    write_log(log, f"task {cfg.name}: model {cfg.model} ({model_dir}), preset {cfg.preset} on {device.describe()}")
    write_log(log, f"memory estimate per worker: {estimate.describe()}")
    write_log(log, "effective config:\n" + dump_train_config(cfg))
    tracker.update(config=cfg.model_dump(mode="json"))  # with the preset's values filled in
    result = run_trainer(cfg, paths, model_dir)
    write_log(log, f"training done: {result['steps']} steps, loss {result['final_loss']}, "
                   f"{result['tokens_per_s']} tokens/s")
    if cfg.merge:
        tracker.status(JobStatus.MERGING)
        write_log(log, f"merging the adapter into {paths.merged}")
        merge_adapter(local_adapter(paths), model_dir, paths.merged)
        if (uri := publish_merged(paths)) is not None:
            write_log(log, f"merged model shared at {uri}")
    meta = build_meta(paths, config=cfg.model_dump(mode="json"), base_model=cfg.model,
                      base_model_path=str(model_dir), result=result, started_at=started_at,
                      device=device.describe(), memory_estimate_gib=estimate.total / GiB)
    write_json_atomic(paths.meta, meta)
    tracker.complete(paths)  # refuses (and removes the meta) if the job was cancelled meanwhile
    write_log(log, f"completed: {meta['type']} model at {meta['merged_path'] or meta['lora_path']}")
    return FinetuneResult(cfg.name, paths, meta)
