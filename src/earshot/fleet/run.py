"""`earshot fleet`: start (or join) Ray, deploy the board, the workers and the gateway, serve on
host/port through Serve's HTTP proxy, and stop cleanly on SIGINT/SIGTERM.

`ray_address` unset: a local Ray on 127.0.0.1 (its dashboard on 127.0.0.1 too, for Prometheus); `auto` or an address: join that
cluster. RAY_USAGE_STATS_ENABLED=0 is set before Ray is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from earshot.settings import Settings

log = logging.getLogger("earshot.fleet")

APP_NAME = "earshot"
NAMESPACE = "earshot"


def quiet_ray_env(*, loopback: bool = False) -> None:
    """Environment for Ray, set before Ray is imported: no usage stats; with `loopback` (a Ray of
    this machine only), every address Ray would resolve for "127.0.0.1" stays 127.0.0.1 (Ray
    otherwise swaps in the machine's outward address, where nothing of ours listens)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@dataclass
class Fleet:
    """A deployed fleet: the gateway's handle and the board actor."""

    handle: Any
    board: Any
    settings: Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_args(num_cpus: float, temp_dir: str | None = None, **extra: Any) -> dict[str, Any]:
    """Arguments of a Ray node on 127.0.0.1 with every port chosen now (none of Ray's defaults,
    which another Ray on the machine may hold; and a raylet with fixed agent ports does not wait
    for port files, which on a loaded machine time out), no dashboard."""
    args: dict[str, Any] = {
        "num_cpus": num_cpus,
        "node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "object_store_memory": 200 * 1024 * 1024,
        "metrics_agent_port": free_port(),
        "metrics_export_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "runtime_env_agent_port": free_port(),
        "object_manager_port": free_port(),
        "node_manager_port": free_port(),
        "min_worker_port": 0,
        "max_worker_port": 0,
    }
    if temp_dir is not None:
        args["temp_dir"] = temp_dir
    args.update(extra)
    return args


def dashboard_args() -> dict[str, Any]:
    """Head-node arguments for Ray's dashboard on 127.0.0.1 (a free port). Its reporter writes Ray's
    Prometheus service-discovery file (`<temp dir>/ray/prom_metrics_service_discovery.json`), which
    deploy/prometheus-fleet.yml follows to every node's metrics agent; without the dashboard there
    is no file. The autoscaler's and the dashboard's own metrics ports are fixed unless these
    variables say otherwise (another Ray on the machine may hold them), so they are set here too."""
    os.environ.setdefault("AUTOSCALER_METRIC_PORT", str(free_port()))
    os.environ.setdefault("DASHBOARD_METRIC_PORT", str(free_port()))
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}


def local_cluster(
    num_cpus: float,
    temp_dir: str | None = None,
    *,
    dashboard: bool = False,
    system_config: dict[str, Any] | None = None,
) -> Any:
    """A one-node Ray on 127.0.0.1 (`ray.cluster_utils.Cluster`: unlike `ray.init()`, it keeps the
    loopback address instead of probing for the machine's outward one); `.shutdown()` stops it.
    `dashboard`: Ray's dashboard on 127.0.0.1, for Prometheus' discovery (see `dashboard_args`).
    `system_config`: Ray's system config for the cluster (the head node's `_system_config`, e.g.
    `{"metrics_report_interval_ms": 1000}`). Call before Ray is imported (see `quiet_ray_env`)."""
    quiet_ray_env(loopback=True)
    from ray.cluster_utils import Cluster

    if temp_dir is not None:  # Ray writes the cluster's address under $RAY_TMPDIR/ray
        os.environ["RAY_TMPDIR"] = temp_dir
        os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    else:
        os.makedirs(os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=False)
    extra = dashboard_args() if dashboard else {}
    if system_config is not None:
        extra["_system_config"] = system_config
    add_node(cluster, lambda: node_args(num_cpus, temp_dir, gcs_server_port=free_port(), **extra))
    return cluster


NODE_START_ATTEMPTS = 3


def add_node(cluster: Any, args: Callable[[], dict[str, Any]], attempts: int = NODE_START_ATTEMPTS) -> Any:
    """`cluster.add_node(**args())`, tried again (fresh ports) when the node fails to start.

    Ray's raylet gives its agents a fixed 15 s to write their port files and exits when they are
    late (ray-project/ray#65983): on a loaded machine a node start fails now and then. The
    processes a failed attempt left are killed before the next."""
    import psutil

    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return cluster.add_node(**args())
        except Exception:
            for proc in me.children(recursive=True):
                if proc.pid not in before:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
            if attempt == attempts:
                raise
            log.warning("a Ray node failed to start (attempt %d of %d); starting it again", attempt, attempts)
    raise AssertionError("unreachable")


def start_ray(settings: Settings) -> Any:
    """Join `settings.ray_address`, or start a local Ray bound to 127.0.0.1 (returned, to stop)."""
    quiet_ray_env(loopback=settings.ray_address is None)
    import ray

    if settings.ray_address is not None:
        ray.init(address=settings.ray_address, namespace=NAMESPACE)
        return None
    cluster = local_cluster(float(os.cpu_count() or 1), dashboard=True)
    ray.init(address=cluster.address, namespace=NAMESPACE)
    return cluster


def deploy(settings: Settings, *, heartbeat_s: float = 1.0, lost_after_s: float = 5.0) -> Fleet:
    """Deploy board, workers and gateway on the Ray this process is connected to; Serve's HTTP
    proxy listens on settings.host:settings.port."""
    quiet_ray_env()
    from ray import serve

    from earshot.fleet.app import application, board_actor

    serve.start(http_options={"host": settings.host, "port": settings.port})
    board = board_actor(settings, lost_after_s=lost_after_s)
    handle = serve.run(application(settings, board, heartbeat_s=heartbeat_s), name=APP_NAME, route_prefix="/")
    return Fleet(handle=handle, board=board, settings=settings)


def stop(fleet: Fleet | None = None, cluster: Any = None) -> None:
    """Delete the app, stop Serve, kill the board (when given), disconnect from Ray, stop the
    local Ray (when given)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()  # type: ignore[no-untyped-call]
    finally:
        if fleet is not None:
            with contextlib.suppress(Exception):  # already gone with its owner
                ray.kill(fleet.board)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def run_fleet(settings: Settings) -> int:
    """The `earshot fleet` command."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    cluster = start_ray(settings)
    fleet: Fleet | None = None
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        fleet = deploy(settings)
        print(
            f"earshot fleet: serving on http://{settings.host}:{settings.port} "
            f"(workers: {_scale(settings)}, {settings.fleet_models_per_worker} models each)",
            flush=True,
        )
        while not stopping.is_set():
            time.sleep(0.5)
        print("earshot fleet: stopping", flush=True)
    finally:
        stop(fleet, cluster)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _scale(settings: Settings) -> str:
    if settings.fleet_min_workers is not None:
        return f"{settings.fleet_min_workers}..{settings.fleet_max_workers}, autoscaled"
    return str(settings.fleet_workers)
