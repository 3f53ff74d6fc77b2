"""`sage_ray.cluster`: a local cluster sage starts is stopped whole, agents included."""

from __future__ import annotations

import psutil
import pytest

pytestmark = pytest.mark.ray


def test_stop_local_cluster_leaves_no_process(sage_home, monkeypatch):
    from sage_ray.cluster import start_local_cluster, stop_local_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    info = start_local_cluster(num_cpus=1)
    named = [p for p in psutil.process_iter(["cmdline"]) if info.temp_dir in " ".join(p.info["cmdline"] or ())]
    family = {p.pid for p in named} | {c.pid for p in named for c in p.children(recursive=True)}
    assert any("raylet" in " ".join(p.info["cmdline"]) for p in named)
    assert len(family) > len(named)  # the agents, retitled without the temp dir in their command line
    client_servers = [p.pid for p in psutil.process_iter(["cmdline"])
                      if "ray.util.client.server" in " ".join(p.info["cmdline"] or ())
                      and any(f.path.startswith(info.temp_dir) for f in p.open_files())]
    assert client_servers  # its command line names only ports: found by its log files
    family |= set(client_servers)

    assert stop_local_cluster(info) >= len(family)
    left = [(pid, psutil.Process(pid).status(), psutil.Process(pid).name()) for pid in family if psutil.pid_exists(pid)]
    assert [entry for entry in left if entry[1] not in ("zombie", "dead")] == []
    assert not (sage_home / "cluster.json").exists()
