"""`sage studio ...`: start, stop, restart, inspect the Studio (the Ray Serve app) on a Ray cluster."""

from __future__ import annotations

import socket
import time
import webbrowser
from pathlib import Path
from typing import Any, Optional

import typer

from sage_ray.cli.common import console, fail, local_registry
from sage_ray.serve.settings import APP_NAME, LLM_DEPLOYMENT, StudioSettings

app = typer.Typer(help="The Studio: web UI, OpenAI-compatible API and Studio API, served by Ray Serve.",
                  no_args_is_help=True)

DEFAULT_PORT = 8000
LOOPBACK = ("127.0.0.1", "localhost", "::1")
NOT_RUNNING = 3  # `status` exit code while the Studio is stopped (as `systemctl status` does)
ADDRESS_HELP = "Ray cluster (GCS) address (default: RAY_ADDRESS, else the local cluster sage started)."


# ---- fine-tuned models ------------------------------------------------------------------
def finetuned_models() -> list[dict[str, Any]]:
    """Completed fine-tunes, newest first: one per task (its merged model, else its adapter),
    plus adapters and merged models registered without a task."""
    seen, models = set(), []
    for artifact in local_registry().list_artifacts():  # newest first, a task's merged model first
        if artifact["kind"] == "base" or (artifact.get("task_id") and artifact["task_id"] in seen):
            continue
        seen.add(artifact.get("task_id"))
        models.append(artifact)
    return models


def format_finetuned(models: list[dict[str, Any]]) -> str:
    lines = [f"Fine-tuned models ({len(models)}):"]
    for number, model in enumerate(models, 1):
        lines += [f"{number}. {model['name']}", f"   type: {model['kind']}",
                  f"   base model: {model.get('base_model') or '-'}", f"   path: {model['path']}",
                  f"   completed: {(model.get('created_at') or '-')[:19]}"]
    if not models:
        lines.append("(none yet: `sage finetune quickstart chat` makes one)")
    lines.append("Use: sage studio start --use-finetuned   |   sage studio start --llm-model <path or task id>")
    return "\n".join(lines)


def check_model(ref: str, settings: StudioSettings) -> None:
    """Fail before deploying when `ref` names no servable model (the same lookup the Studio does)."""
    from sage_ray.serve.resolve import ModelRefError, find_artifact

    try:  # a built-in model is built by the LLM service itself, not here
        find_artifact(ref, local_registry(), settings.roots(), build=False)
    except ModelRefError as err:
        fail(f"--llm-model {ref}: {err}\n`sage studio start --list-finetuned` lists the fine-tunes, "
             "`sage llm model show` every model")


# ---- cluster and Serve ------------------------------------------------------------------
def join_cluster(address: str | None, *, start: bool):
    """Join (or with `start`, find or start) the cluster; None when none runs and `start` is False."""
    from sage_ray.cluster import ClusterError, ensure_cluster, find_cluster

    try:
        return ensure_cluster(address) if start else find_cluster(address)
    except ClusterError as err:
        fail(str(err))
    except ConnectionError as err:
        fail(f"cannot join the Ray cluster at {address}: {err}\nIs it running? `ray status --address {address}`")


def serve_details() -> dict[str, Any]:
    from sage_ray.serve.deploy import serve_details as details

    try:
        return details()
    except Exception as err:  # the dashboard's REST API is down or refuses
        fail(f"cannot read Serve's state from the cluster's dashboard: {err}\n"
             "The dashboard must run (ray start --head --include-dashboard=true)")


def choose_port(details: dict[str, Any], host: str, port: int | None) -> int:
    """The port the Studio will listen on. Serve's proxy keeps the host and port it first started
    with for the cluster's life, so a running Serve decides; else the port must be free."""
    http = details.get("http_options") or {}
    if details.get("controller_info") and http.get("port"):
        running = (http.get("host") or "127.0.0.1", int(http["port"]))
        if (port is not None and port != running[1]) or host != running[0]:
            fail(f"Ray Serve on this cluster already listens on {running[0]}:{running[1]} and cannot move while "
                 f"it runs: use --host {running[0]} --port {running[1]}, or `sage studio stop` first")
        return running[1]
    port = port or DEFAULT_PORT
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            fail(f"port {port} on {host} is taken by another program ({err.strerror}): pick a free one with "
                 f"--port, e.g. --port {port + 1}")
    return port


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Loopback needs nothing; another interface needs an API key, or --insecure said knowingly."""
    if host in LOOPBACK:
        return
    if not api_key and not insecure:
        fail(f"--host {host} makes the Studio reachable from the network, where anyone could run fine-tunes, "
             "switch models and read datasets: protect it with --api-key KEY (or SAGE_STUDIO_API_KEY), or "
             "pass --insecure if this network is trusted")
    console.print(f"[yellow]warning:[/] --host {host}: the Studio is reachable from the network" +
                  ("; requests need the API key." if api_key else " WITHOUT an API key (--insecure)."))


def _wait_text(app: dict[str, Any]) -> str:
    deployments = app.get("deployments") or {}
    parts = [f"{name} {d.get('status', '?').lower()}" for name, d in sorted(deployments.items())]
    return f"deploying the Studio: {app.get('status', 'starting').lower()}" + (f" ({', '.join(parts)})" if parts else "")


def deploy(settings: StudioSettings, *, host: str, port: int) -> str:
    """Start Serve on host:port, config-deploy the Studio with a spinner, return its URL."""
    from ray import serve

    from sage_ray.serve.deploy import deploy_studio

    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    with console.status(f"deploying the Studio with model {settings.model} ...") as spinner:
        try:
            deploy_studio(settings, host=host, port=port, app_name=APP_NAME,
                          on_wait=lambda app: spinner.update(_wait_text(app)))
        except (RuntimeError, TimeoutError) as err:
            fail(f"{err}\nThe replicas' logs: sage studio logs")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def launch(*, model: str | None = None, use_finetuned: bool = False, host: str = "127.0.0.1",
           port: int | None = None, address: str | None = None, api_key: str | None = None,
           engine: str | None = None, ui: bool = True, insecure: bool = False) -> str:
    """Everything `sage studio start` does up to the URL (also used by `sage chat --backend finetune`)."""
    if use_finetuned and model:
        fail("give either --use-finetuned or --llm-model, not both")
    if use_finetuned:
        models = finetuned_models()
        if not models:
            fail("no completed fine-tune yet: run one first (`sage finetune quickstart chat`), or pick a model "
                 "with --llm-model")
        model = models[0]["name"]
        console.print(f"serving the newest fine-tune: [bold]{model}[/] ({models[0]['kind']}, {models[0]['path']})")
    try:
        settings = StudioSettings.from_env(model=model, engine=engine, api_key=api_key, ui=None if ui else False)
    except ValueError as err:
        fail(str(err))
    check_exposure(host, settings.api_key_hash, insecure)
    if host not in LOOPBACK:  # reached by the machine's names and addresses, which only the user knows
        settings.allowed_hosts = ["*"]
    check_model(settings.model, settings)
    info = join_cluster(address, start=True)
    port = choose_port(serve_details(), host, port)
    url = deploy(settings, host=host, port=port)
    console.print(f"[green]the Studio is running[/] on Ray cluster {info.address} (dashboard {info.dashboard_url})")
    console.print(f"  web UI:     {url}/" + ("" if settings.ui else "  (disabled)"))
    console.print(f"  OpenAI API: {url}/v1   (model: {settings.model})")
    console.print(f"  Studio API: {url}/api/finetune   |   chat here: sage chat   |   stop: sage studio stop")
    return url


@app.command()
def start(
    use_finetuned: bool = typer.Option(False, "--use-finetuned", help="Serve the newest completed fine-tune."),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="Model to serve: a path, a task id or a "
                                            "registry name (default: SAGE_STUDIO_LLM_MODEL, else 'demo')."),
    list_finetuned: bool = typer.Option(False, "--list-finetuned", help="Print the fine-tuned models and exit."),
    port: Optional[int] = typer.Option(None, help=f"HTTP port (default: {DEFAULT_PORT}, or the port Serve "
                                                  "already listens on)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on; anything but loopback exposes the Studio."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Do not open the web UI in a browser."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP + " A new one starts if none runs."),
    api_key: Optional[str] = typer.Option(None, help="Require `Authorization: Bearer KEY` on the API "
                                                     "(default: SAGE_STUDIO_API_KEY)."),
    engine: Optional[str] = typer.Option(None, help="auto, hf or vllm (default: auto = vLLM when a GPU and vllm "
                                                    "are there, else transformers)."),
    no_ui: bool = typer.Option(False, "--no-ui", hidden=True, help="Serve the APIs without the Gradio UI."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without an API key."),
) -> None:
    """Start (or join) a Ray cluster, deploy the Studio, wait until it is healthy, print its URL."""
    if list_finetuned:
        print(format_finetuned(finetuned_models()))
        return
    url = launch(model=llm_model, use_finetuned=use_finetuned, host=host, port=port, address=address,
                 api_key=api_key, engine=engine, ui=not no_ui, insecure=insecure)
    print(url)
    if not no_browser and not no_ui:
        webbrowser.open(f"{url}/")


def _settle_switch(details: dict[str, Any], timeout_s: float = 15) -> None:
    """Let a just-made switch's config deploy land first (it follows the switch in the
    background): a deploy arriving after the delete would bring the app back."""
    import time

    from sage_ray.serve.deploy import serve_details

    deadline = time.monotonic() + timeout_s
    declared = _declared_now(details)
    while declared and time.monotonic() < deadline:
        config = (details.get("applications", {}).get(APP_NAME) or {}).get("deployed_app_config") or {}
        llm = next((d for d in config.get("deployments", []) if d.get("name") == LLM_DEPLOYMENT), {})
        if (llm.get("user_config") or {}).get("model") == declared:
            return
        time.sleep(0.3)
        details = serve_details()


def _delete_app(details: dict[str, Any], *, keep_serve: bool) -> bool:
    """Delete the Studio app (True if there was one); shut Serve down when no other app uses it,
    which frees its port (Serve never lets go of a port while it runs)."""
    from ray import serve

    apps = details.get("applications") or {}
    if APP_NAME in apps:
        _settle_switch(details)
        serve.delete(APP_NAME)
    if not keep_serve and details.get("controller_info") and not set(apps) - {APP_NAME}:
        serve.shutdown()
    return APP_NAME in apps


@app.command()
def stop(
    all_: bool = typer.Option(False, "--all", help="Also stop the local Ray cluster, if sage started it."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Stop the Studio (fine-tune jobs keep running); with --all also the cluster sage started."""
    import ray

    from sage_ray.cluster import stop_local_cluster

    info = join_cluster(address, start=False)
    if info is None:
        console.print("no Ray cluster is running here: the Studio is not running")
        return
    had = _delete_app(serve_details(), keep_serve=False)
    console.print("stopped the Studio" if had else "the Studio was not running")
    if not all_:
        return
    if not info.temp_dir:
        console.print(f"[yellow]left the Ray cluster at {info.address} running:[/] sage did not start it; stop it "
                      "with the tool that started it")
        return
    ray.shutdown()
    stopped = stop_local_cluster(info)
    console.print(f"stopped the local Ray cluster at {info.address} ({stopped} processes)")


@app.command()
def restart(
    use_finetuned: bool = typer.Option(False, "--use-finetuned", help="Serve the newest completed fine-tune."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    no_ui: bool = typer.Option(False, "--no-ui", hidden=True),
) -> None:
    """Redeploy the Studio with fresh replicas, same settings, port and served model."""
    info = join_cluster(address, start=False)
    details = serve_details() if info is not None else {}
    app_ = (details.get("applications") or {}).get(APP_NAME)
    if app_ is None or not app_.get("deployed_app_config"):
        console.print("the Studio is not running: starting it")
        print(launch(use_finetuned=use_finetuned, address=address, ui=not no_ui))
        return
    config = app_["deployed_app_config"]
    llm = next((d for d in config.get("deployments", []) if d.get("name") == LLM_DEPLOYMENT), {})
    settings = StudioSettings(**config.get("args", {}))
    # keeps a switched-to model: the replica's own declaration is the freshest (the config
    # deploy that records a switch follows the switch in the background)
    model = _declared_now(details) or (llm.get("user_config") or {}).get("model") or settings.model
    if use_finetuned:
        models = finetuned_models()
        if not models:
            fail("no completed fine-tune yet: run one first (`sage finetune quickstart chat`)")
        model = models[0]["name"]
    settings = settings.model_copy(update={"model": model, **({"ui": False} if no_ui else {})})
    http = details.get("http_options") or {}
    _delete_app(details, keep_serve=True)
    url = deploy(settings, host=http.get("host", "127.0.0.1"), port=int(http.get("port", DEFAULT_PORT)))
    console.print(f"[green]restarted the Studio[/] with model {model}")
    print(url)


def _studio_url(details: dict[str, Any]) -> str:
    http = details.get("http_options") or {}
    return f"http://{http.get('host', '127.0.0.1').replace('0.0.0.0', '127.0.0.1')}:{http.get('port', DEFAULT_PORT)}"


def _declared_now(details: dict[str, Any]) -> str | None:
    """The model the running LLM replica has declared, or None when it cannot say."""
    from sage_ray.client import StudioClient, StudioError

    try:
        with StudioClient(_studio_url(details), timeout=15) as client:
            return client.models.current().declared
    except StudioError:
        return None


def _replicas(deployment: dict[str, Any]) -> str:
    replicas = deployment.get("replicas") or []
    running = sum(1 for r in replicas if r.get("state") == "RUNNING")
    return f"{running}/{deployment.get('target_num_replicas', len(replicas))} replicas running"


@app.command()
def status(address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
    """The cluster, the Studio's health per deployment, the active model and running jobs.
    Exit code: 0 running and healthy, 1 deployed but not healthy, 3 not running."""
    from sage_ray.client import StudioClient, StudioError

    info = join_cluster(address, start=False)
    if info is None:
        console.print("no Ray cluster is running here, so the Studio is not running: start both with "
                      "`sage studio start`")
        raise typer.Exit(NOT_RUNNING)
    print(f"cluster: {info.address} (dashboard {info.dashboard_url})")
    details = serve_details()
    app_ = (details.get("applications") or {}).get(APP_NAME)
    if app_ is None:
        print("studio: not running (start it with `sage studio start`)")
        raise typer.Exit(NOT_RUNNING)
    url = _studio_url(details)
    print(f"studio: {app_.get('status')} at {url}" + (f" ({app_['message']})" if app_.get("message") else ""))
    for name, deployment in sorted((app_.get("deployments") or {}).items()):
        print(f"  {name}: {deployment.get('status')}, {_replicas(deployment)}")
    # the key itself is never in the Serve config: StudioClient takes it from SAGE_STUDIO_API_KEY
    with StudioClient(url, timeout=15) as client:
        try:
            current = client.models.current()
            error = f", last error: {current.error}" if current.error else ""
            print(f"model: {current.name} ({current.kind or '-'}), {current.state}{error}")
            running = [job for job in client.jobs.list() if not job.done]
            print(f"running jobs: {len(running)}")
            for job in running:
                print(f"  {job.task_id}: {job.status} {job.progress:.0f}% step {job.step or 0}/{job.total_steps or '?'}")
        except StudioError as err:
            print(f"the Studio does not answer at {url}: {err.message}")
            raise typer.Exit(1)
    if app_.get("status") != "RUNNING":
        raise typer.Exit(1)


def replica_logs(address: str | None) -> tuple[Path, list[Path]]:
    """The folder of Serve's logs in the cluster's session and the Studio replicas' files in it."""
    import ray

    info = join_cluster(address, start=False)
    if info is None:
        fail("no Ray cluster is running here: start the Studio with `sage studio start`")
    folder = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    files = sorted(folder.glob(f"replica_{APP_NAME}_*.log"), key=lambda p: p.stat().st_mtime)
    if not files:
        fail(f"no Studio replica logs in {folder}: the Studio has not run on this cluster, or the cluster runs on "
             f"another machine (its dashboard shows the logs: {info.dashboard_url})")
    return folder, files


@app.command()
def logs(
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing what the replicas write (Ctrl-C stops)."),
    lines: int = typer.Option(50, "--lines", "-n", help="Lines to show from the end of each replica's log."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """The Studio's Serve replica logs (StudioIngress and LLMServer) from the Ray session's log folder."""
    folder, files = replica_logs(address)
    offsets: dict[Path, int] = {}
    for path in files:
        data = path.read_bytes()
        print(f"==> {path.name} <==")
        tail = data.decode("utf-8", errors="replace").splitlines()[-lines:] if lines > 0 else []
        print("\n".join(tail), flush=True)
        offsets[path] = len(data)
    shown = files[-1] if files else None
    try:
        while follow:
            time.sleep(0.5)
            for path in sorted(folder.glob(f"replica_{APP_NAME}_*.log")):  # a restarted replica writes a new file
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    new = f.read()
                if new:
                    if path != shown:
                        print(f"==> {path.name} <==")
                        shown = path
                    print(new.decode("utf-8", errors="replace"), end="", flush=True)
                    offsets[path] = offsets.get(path, 0) + len(new)
    except KeyboardInterrupt:
        pass
