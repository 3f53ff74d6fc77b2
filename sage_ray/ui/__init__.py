"""The Studio web UI (Gradio): `build_ui(service)` and `mount_ui(app, service)`."""

from sage_ray.ui.app import build_ui, launch_kwargs, mount_ui

__all__ = ["build_ui", "launch_kwargs", "mount_ui"]
