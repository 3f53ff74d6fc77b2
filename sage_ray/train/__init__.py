"""Fine-tuning on Ray Train: the per-worker loop, the TorchTrainer driver, merging.

`python -m sage_ray.train CONFIG.yaml` runs one job (this is what `ray job submit` runs).
"""
