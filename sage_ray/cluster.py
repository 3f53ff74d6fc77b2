"""Joining or starting the Ray cluster every entry point works against.

`connect` joins this process to Ray (drivers, jobs); `ensure_cluster` finds or starts the
long-lived cluster that `sage finetune start` and `sage studio start` submit to:
1. an explicit address, else RAY_ADDRESS;
2. the local cluster sage-ray started before (recorded in $SAGE_HOME/cluster.json), if alive;
3. a local cluster started with `ray start --head` (Ray's own record of it), if alive;
4. else a new one: `ray start --head` bound to 127.0.0.1 with its own ports and temp dir.

Authentication: Ray 2.60 turns token auth on for local clusters. A cluster sage-ray starts
has its node IP, dashboard and Jobs API on 127.0.0.1 and is started, and joined, with
RAY_AUTH_MODE=disabled; for any other cluster the caller's RAY_AUTH_MODE (and token) apply
unchanged. Caveat (measured, Ray 2.60): the GCS and raylet gRPC ports still listen on every
interface (Ray has no bind-address setting), so on a machine reachable from an untrusted
network, firewall those ports or run a token-auth cluster yourself and pass --address.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from sage_ray import env
from sage_ray.errors import SageError
from sage_ray.paths import sage_home

STATE_FILE = "cluster.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ClusterError(SageError, RuntimeError):
    """No cluster could be joined or started; the message says what to do."""


@dataclass
class ClusterInfo:
    address: str  # the GCS address, for ray.init / RAY_ADDRESS
    dashboard_url: str  # http://host:port, for Ray Jobs and Serve's REST API
    started: bool = False  # True when this call started it
    temp_dir: str | None = None  # set for clusters sage-ray started (their processes carry it)


def connect(address: str | None = None, *, log_to_driver: bool = True) -> None:
    """Connect this process to Ray: an explicit address, `RAY_ADDRESS`, or a new local cluster.

    Inside `ray job submit` RAY_ADDRESS is set, so the job joins the cluster it was sent to;
    from a shell with no cluster running, a local one starts and stops with the process.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or env.value("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        address = _gcs_for_dashboard(address)
    # "local": ray.init(None) would join whatever cluster was started last on this machine
    ray.init(address=address or "local", log_to_driver=log_to_driver, configure_logging=False)


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def dashboard_url() -> str:
    """The dashboard (Ray Jobs API) URL of the cluster this process is connected to; works in a
    driver and inside an actor or Serve replica alike (the dashboard publishes it in the GCS)."""
    from ray._private.services import get_webui_url_from_internal_kv

    connect()
    url = env.value("RAY_OVERRIDE_DASHBOARD_URL") or get_webui_url_from_internal_kv()
    if not url:
        raise ClusterError("the connected Ray cluster has no dashboard, which Ray Jobs need; start it with "
                           "`ray start --head --include-dashboard=true` (or use `sage finetune start`, which does)")
    return url if "://" in url else f"http://{url}"


def is_loopback(url_or_address: str) -> bool:
    host = urlparse(url_or_address if "://" in url_or_address else f"//{url_or_address}").hostname
    return host in LOOPBACK


def find_cluster(address: str | None = None) -> ClusterInfo | None:
    """Join the cluster at `address` / RAY_ADDRESS, else a running local one; None if there is
    none (nothing is started). A process already connected (a test, a Serve replica) stays
    on its cluster."""
    import ray

    if ray.is_initialized():
        return ClusterInfo(ray.get_runtime_context().gcs_address, dashboard_url())
    address = address or env.value("RAY_ADDRESS")
    if address:
        if address.startswith(("http://", "https://")):
            address = _gcs_for_dashboard(address)
        connect(address, log_to_driver=False)
        return ClusterInfo(address, dashboard_url())
    for info in (_recorded_cluster(), _ray_current_cluster()):
        if info is not None and _gcs_alive(info.address):
            if info.temp_dir:  # ours: 127.0.0.1 only, started with auth disabled
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            connect(info.address, log_to_driver=False)
            return ClusterInfo(info.address, dashboard_url(), temp_dir=info.temp_dir)
    return None


def ensure_cluster(address: str | None = None) -> ClusterInfo:
    """The cluster to submit to, joined by this process: found, or started (see module doc)."""
    info = find_cluster(address)
    if info is None:
        info = start_local_cluster()
        connect(info.address, log_to_driver=False)
    return info


def start_local_cluster(num_cpus: int | None = None, dashboard_port: int | None = None,
                        attempts: int = 3) -> ClusterInfo:
    """`ray start --head` on 127.0.0.1 with free ports and its own temp dir; recorded in
    $SAGE_HOME/cluster.json so the next command joins it. Outlives this process.

    Every port is picked free, not left to Ray's defaults: two clusters on one machine would
    otherwise share the dashboard agent's fixed port, and the second could not run jobs. A port
    taken between the pick and Ray's bind means a cleanup and another try with new ports."""
    for attempt in range(attempts):
        port = dashboard_port or (8265 if attempt == 0 and _port_free(8265) else _free_port())
        info, error = _ray_start(num_cpus, port)
        if info is not None:
            break
        if "already occupied" not in error and "in use" not in error or attempt == attempts - 1:
            raise ClusterError(f"`ray start --head` failed:\n{error[-2000:]}\n"
                               "Start a cluster yourself (ray start --head) and pass --address, or set RAY_ADDRESS")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    state = sage_home() / STATE_FILE
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(asdict(info), indent=2), encoding="utf-8")
    return info


def _ray_start(num_cpus: int | None, dashboard_port: int) -> tuple[ClusterInfo | None, str]:
    temp_dir = tempfile.mkdtemp(prefix="sage_ray_", dir="/tmp")  # short: socket paths are length-limited
    gcs_port = _free_port()
    ports = {flag: _free_port() for flag in (
        "--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
        "--dashboard-agent-listen-port", "--metrics-export-port", "--runtime-env-agent-port",
        "--ray-client-server-port")}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
               f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               *(f"{flag}={port}" for flag, port in ports.items())]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    # jobs run `python -m sage_ray.train`: this interpreter's folder first on the cluster's PATH
    child_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SAGE_HOME": str(sage_home()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    child_env.pop("RAY_ADDRESS", None)
    info = ClusterInfo(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", True, temp_dir)
    proc = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return info, ""
    stop_local_cluster(info)  # what started before the failure
    return None, f"exit {proc.returncode}: {proc.stderr.strip()}"


def stop_local_cluster(info: ClusterInfo, timeout_s: float = 5) -> int:
    """Stop a cluster sage-ray started, and only it: its processes are the ones whose command
    line names its own temp dir (`ray stop` would stop every cluster on the machine)."""
    import psutil

    if not info.temp_dir:
        raise ClusterError("only a cluster sage-ray started (with its own temp dir) can be stopped here; "
                           "stop others with the tool that started them")
    named = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            command = proc.info["cmdline"] or ()
            # The Ray Client server names only ports in its command line (and outlives the cluster
            # by minutes): it is known by its log files, open in the temp dir.
            if any(info.temp_dir in part for part in command) or (
                    "ray.util.client.server" in command and _holds_files_in(proc, info.temp_dir)):
                named.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    # The raylet's agents retitle themselves (`ray::DashboardAgent`), dropping the temp dir from
    # their command line: they are found as its children, before it exits and they are orphaned.
    mine = {proc.pid: proc for proc in named}
    for proc in named:
        try:
            mine.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    mine = list(mine.values())
    for proc in mine:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(mine, timeout=timeout_s)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=5)  # gone, not just signalled, when this returns
    state = sage_home() / STATE_FILE
    if state.exists() and json.loads(state.read_text()).get("temp_dir") == info.temp_dir:
        state.unlink()
    return len(mine)


def _holds_files_in(proc, folder: str) -> bool:
    return any(opened.path.startswith(folder) for opened in proc.open_files())


def _recorded_cluster() -> ClusterInfo | None:
    try:
        values = json.loads((sage_home() / STATE_FILE).read_text(encoding="utf-8"))
        return ClusterInfo(values["address"], values["dashboard_url"], False, values.get("temp_dir"))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _ray_current_cluster() -> ClusterInfo | None:
    """A cluster started by hand with `ray start --head` on this machine (Ray records its address)."""
    try:
        address = Path("/tmp/ray/ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return ClusterInfo(address, "") if address else None


def _gcs_for_dashboard(url: str) -> str:
    """Ray Jobs take the dashboard URL, ray.init the GCS address: map one local cluster's URL to
    the other through our record; for other clusters ask for the GCS address."""
    recorded = _recorded_cluster()
    if recorded and recorded.dashboard_url.rstrip("/") == url.rstrip("/"):
        if recorded.temp_dir:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        return recorded.address
    raise ClusterError(f"{url} is a dashboard URL; sage-ray needs the cluster's GCS address (host:port, the "
                       "address `ray start --head` prints, default port 6379): pass that as --address / RAY_ADDRESS")


def _gcs_alive(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
