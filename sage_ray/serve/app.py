"""Build the Studio's Serve application: StudioIngress in front of LLMServer.

`serve run configs/studio.yaml` calls `build_app(args)` with the config's `args:`;
`serve run apps.studio:app` uses `apps/studio.py`, built from SAGE_* environment variables.
"""

from __future__ import annotations

from typing import Any

from sage_ray.serve.settings import StudioSettings


def build_app(args: dict[str, Any] | None = None):
    """The Studio app for `settings` given as a dict (a Serve config's `args`); unset = defaults/env."""
    from sage_ray.placement import llm_actor_options
    from sage_ray.serve.ingress import StudioIngress
    from sage_ray.serve.llm_server import LLMServer

    settings = StudioSettings.from_env(**(args or {}))
    values = settings.model_dump(mode="json")
    llm = LLMServer.options(
        num_replicas=settings.llm_replicas, user_config=settings.llm_user_config(),
        ray_actor_options=llm_actor_options(settings.llm_num_cpus, settings.llm_num_gpus, settings.llm_resources),
    ).bind(values)
    return StudioIngress.bind(values, llm)
