"""The device a training worker gets (probed by the trainer with the workers' own resource request)."""

from __future__ import annotations

from sage_ray.presets import DeviceInfo


def local_device(use_gpu: bool) -> DeviceInfo:
    """The device of this process: the first visible GPU, else the machine's memory."""
    import torch

    if use_gpu and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return DeviceInfo("cuda", torch.cuda.get_device_name(), total, free, torch.cuda.is_bf16_supported())
    import psutil

    memory = psutil.virtual_memory()
    return DeviceInfo("cpu", "CPU", memory.total, memory.available, False)


def cluster_has_gpu() -> bool:
    """GPUs in the cluster now, or in a node group its autoscaler can start."""
    import ray

    from sage_ray.placement import autoscaler_ceiling

    return ray.cluster_resources().get("GPU", 0) > 0 or (autoscaler_ceiling() or {}).get("GPU", 0) > 0
