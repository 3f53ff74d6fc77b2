"""Changing the Studio's declared model through Serve's config API (the dashboard's REST API).

Only a config deploy changes a deployment's `user_config` in place (replicas run
`reconfigure`, nothing restarts); `serve.run` again would restart them. A config deploy
replaces every config-deployed application, so the whole current config is sent back with
one field changed. An app first started by import path (`serve run apps.studio:app`) has no
config yet: the first switch writes one, which Serve applies with one restart; after that,
switches are in place.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

from sage_ray import storage
from sage_ray.serve.settings import LLM_DEPLOYMENT, StudioSettings

BUILDER = "sage_ray.serve.app:build_app"
log = logging.getLogger("ray.serve")


def _client():
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from sage_ray.cluster import dashboard_url

    return ServeSubmissionClient(dashboard_url())


def serve_details() -> dict[str, Any]:
    return _client().get_serve_details()


def app_config(details: dict[str, Any], app_name: str, settings: StudioSettings) -> dict[str, Any]:
    """The app's deployed config, or one written from its settings when it was started by import path."""
    app = details.get("applications", {}).get(app_name) or {}
    if app.get("deployed_app_config"):
        return copy.deepcopy(app["deployed_app_config"])
    return {"name": app_name, "route_prefix": app.get("route_prefix") or "/", "import_path": BUILDER,
            "args": settings.model_dump(mode="json"), "deployments": []}


def with_llm_user_config(config: dict[str, Any], user_config: dict[str, Any]) -> dict[str, Any]:
    deployments = [d for d in config.get("deployments", []) if d.get("name") != LLM_DEPLOYMENT]
    current = next((d for d in config.get("deployments", []) if d.get("name") == LLM_DEPLOYMENT), {})
    return {**config, "deployments": [*deployments, {**current, "name": LLM_DEPLOYMENT, "user_config": user_config}]}


def declare_model(settings: StudioSettings, app_name: str, ref: str, details: dict[str, Any] | None = None,
                  version: int = 0, canary: dict[str, Any] | None = None) -> bool:
    """Declare `ref` (and its `canary`, {"model", "weight"}, or none) as the app's model by a
    whole-config deploy (on top of `details`, Serve's current state, fetched if not given); True
    when the app had a config already (the switch happens in place), False when this deploy
    takes the app over."""
    client = _client()
    details = details or client.get_serve_details()
    if app_name not in details.get("applications", {}):
        return False  # deleted meanwhile (`sage studio stop`): a declaration must not bring it back
    mine = app_config(details, app_name, settings)
    previous = next((d.get("user_config") for d in mine.get("deployments", []) if d.get("name") == LLM_DEPLOYMENT), None)
    user_config = {**settings.llm_user_config(), **(previous or {}), "model": ref, "version": version,
                   "canary": canary}
    others = [copy.deepcopy(app["deployed_app_config"]) for name, app in details.get("applications", {}).items()
              if name != app_name and app.get("deployed_app_config")]
    body: dict[str, Any] = {"applications": [*others, with_llm_user_config(mine, user_config)]}
    http = details.get("http_options") or {}
    if http:
        body["http_options"] = {k: http[k] for k in ("host", "port") if k in http}
    if details.get("proxy_location"):
        body["proxy_location"] = details["proxy_location"]
    client.deploy_applications(body)
    return bool((details.get("applications", {}).get(app_name) or {}).get("deployed_app_config"))


class BackgroundDeployer:
    """Config deploys of the latest declaration, one at a time, off the request's path: a
    switch already in force on the replica only needs the config to catch up (to survive a
    restart), and a burst of switches needs only the last one deployed."""

    def __init__(self, settings: StudioSettings, app_name: str):
        self.settings, self.app_name = settings, app_name
        self._pending: tuple[str, int, dict | None] | None = None
        self._busy = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, ref: str, version: int, canary: dict[str, Any] | None = None) -> None:
        with self._cv:
            self._pending = (ref, version, canary)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sage-config-deploy", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def flush(self, timeout_s: float = 60) -> bool:
        """Wait until every submitted declaration is deployed; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending is None and not self._busy, timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None)
                (ref, version, canary), self._pending, self._busy = self._pending, None, True
            try:
                declare_model(self.settings, self.app_name, ref, version=version, canary=canary)
            except Exception:  # the switch is in force; only its survival of a restart is at stake
                log.exception("sage-ray: the config deploy declaring %r failed", ref)
            with self._cv:
                self._busy = False
                self._cv.notify_all()


def deployment_status(details: dict[str, Any], app_name: str, deployment: str = LLM_DEPLOYMENT) -> str | None:
    """HEALTHY, UPDATING, UNHEALTHY, ... of one deployment, or None when it is not deployed."""
    app = details.get("applications", {}).get(app_name) or {}
    return (app.get("deployments", {}).get(deployment) or {}).get("status")


def studio_config(settings: StudioSettings, *, host: str = "127.0.0.1", port: int = 8000,
                  app_name: str = "studio") -> dict[str, Any]:
    """The Serve config of the Studio (what configs/studio.yaml holds), for a config deploy."""
    app: dict[str, Any] = {"name": app_name, "route_prefix": "/", "import_path": BUILDER,
                           "args": settings.model_dump(mode="json"),
                           "deployments": [{"name": LLM_DEPLOYMENT, "user_config": settings.llm_user_config()}]}
    if env := storage.forwarded_env():  # replicas on other nodes fetch shared models with these
        app["runtime_env"] = {"env_vars": env}
    return {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": [app]}


def deploy_studio(settings: StudioSettings, *, host: str = "127.0.0.1", port: int = 8000, app_name: str = "studio",
                  timeout_s: float = 600, on_wait=None) -> dict[str, Any]:
    """Config-deploy the Studio onto the connected cluster (keeping its other config-deployed
    apps) and wait until every deployment is healthy; returns Serve's details."""
    import time

    client = _client()
    details = client.get_serve_details()
    others = [copy.deepcopy(app["deployed_app_config"]) for name, app in details.get("applications", {}).items()
              if name != app_name and app.get("deployed_app_config")]
    body = studio_config(settings, host=host, port=port, app_name=app_name)
    body["applications"] = [*others, *body["applications"]]
    client.deploy_applications(body)
    deadline = time.monotonic() + timeout_s
    while True:
        details = client.get_serve_details()
        app = details.get("applications", {}).get(app_name) or {}
        if app.get("status") == "RUNNING":
            return details
        if app.get("status") == "DEPLOY_FAILED":
            raise RuntimeError(f"the Studio failed to deploy: {app.get('message') or app}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Studio was not healthy after {timeout_s:.0f} s: {app.get('status')}: "
                               f"{app.get('message', '')}")
        if on_wait:
            on_wait(app)
        time.sleep(0.5)
