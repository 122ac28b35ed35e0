"""A real Ray cluster on loopback (a head and a second node, `ray.cluster_utils.Cluster`, every
port chosen, a temp dir of its own) with the fleet deployed: 2 workers, 1 model per worker.

Module-scoped: one cluster for the module's tests. Teardown stops Serve, Ray and both nodes and
checks that no process of this cluster is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from earshot.fleet.run import (
    Fleet,
    add_node,
    deploy,
    free_port,
    local_cluster,
    node_args,
    quiet_ray_env,
    stop,
)
from earshot.settings import Settings

HEARTBEAT_S = 0.5
LOST_AFTER_S = 5.0  # silence that makes a worker lost: well above a heartbeat stalled by a loaded machine
LOAD_TIMEOUT_S = 90.0

# Ray reads its environment when it is first imported, and a test module may import Ray (through
# earshot.fleet) before a fixture starts a cluster: set it when the package's conftest loads.
quiet_ray_env(loopback=True)


@dataclass
class FleetServer:
    url: str
    fleet: Fleet
    temp_dir: str
    settings: Settings

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(self.url + path, params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def events(self) -> list[dict[str, Any]]:
        return list(self.get("/api/events")["events"])

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=30).text


def _ours(temp_dir: str, before: frozenset[int]) -> list[psutil.Process]:
    """Processes of this cluster: this process's children born since the cluster started (Ray's
    workers rename themselves `ray::...`; `before` holds the children that were there already, e.g.
    a server or Prometheus of an earlier test module's fixture), and any process whose command line
    names the cluster's temp dir."""
    found = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@contextlib.contextmanager
def start_fleet_server(
    models_dir: Path, *, dashboard: bool = False, system_config: dict[str, Any] | None = None
) -> Iterator[FleetServer]:
    """The 2-node cluster with the fleet deployed; `dashboard`: Ray's dashboard on the head node
    (127.0.0.1), which writes Ray's Prometheus service-discovery file; `system_config`: Ray's
    system config of the cluster (e.g. metrics_report_interval_ms). Stops all of it at the end and
    checks that no process of the cluster is left."""
    quiet_ray_env(loopback=True)  # before Ray is imported
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")  # short: Ray's unix sockets live in it
    before = frozenset(p.pid for p in psutil.Process().children(recursive=True))
    env_before = {k: os.environ.get(k) for k in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")}
    cluster = local_cluster(1, temp_dir, dashboard=dashboard, system_config=system_config)
    fleet: Fleet | None = None
    try:
        add_node(cluster, lambda: node_args(1, temp_dir))
        ray.init(address=cluster.address, namespace="earshot")
        settings = Settings(
            host="127.0.0.1",
            port=free_port(),
            models_dir=models_dir,
            fleet_workers=2,
            fleet_models_per_worker=1,
            fleet_cpus_per_worker=1,  # one per node: each node has 1 CPU
            model_load_timeout=LOAD_TIMEOUT_S,
            shutdown_grace_seconds=2,
            allow_hub_models=False,
            log_level="WARNING",
        )
        fleet = deploy(settings, heartbeat_s=HEARTBEAT_S, lost_after_s=LOST_AFTER_S)
        server = FleetServer(f"http://127.0.0.1:{settings.port}", fleet, temp_dir, settings)
        deadline = time.monotonic() + 60
        while len(server.get("/api/ps")["workers"]) < 2:
            assert time.monotonic() < deadline, "the workers did not register with the board"
            time.sleep(0.5)
        yield server
    finally:
        try:
            stop(fleet, cluster)
        finally:
            deadline = time.monotonic() + 30
            while _ours(temp_dir, before) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = []
            for proc in _ours(temp_dir, before):  # never leave them running, even when the check fails
                try:
                    left.append((proc.pid, " ".join(proc.cmdline())[:120]))
                    proc.kill()
                except psutil.NoSuchProcess:
                    continue
            shutil.rmtree(temp_dir, ignore_errors=True)
            os.environ.pop("RAY_TMPDIR", None)
            for key, value in env_before.items():  # dashboard_args() chose these for this cluster
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            assert not left, f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def fleet_server(models_dir: Path) -> Iterator[FleetServer]:
    with start_fleet_server(models_dir) as server:
        yield server
