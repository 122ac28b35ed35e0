"""`earshot fleet`: start (or join) Ray, deploy the board, the workers and the gateway, serve on
host/port through Serve's HTTP proxy, and stop cleanly on SIGINT/SIGTERM.

`ray_address` unset: a local Ray on 127.0.0.1 (dashboard off); `auto` or an address: join that
cluster. RAY_USAGE_STATS_ENABLED=0 is set before Ray is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from earshot.settings import Settings

APP_NAME = "earshot"
NAMESPACE = "earshot"


def quiet_ray_env() -> None:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@dataclass
class Fleet:
    """A deployed fleet: the gateway's handle and the board actor."""

    handle: Any
    board: Any
    settings: Settings


def start_ray(settings: Settings, **init: Any) -> None:
    """Join `settings.ray_address`, or start a local Ray bound to 127.0.0.1."""
    quiet_ray_env()
    import ray

    if settings.ray_address is None:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            namespace=NAMESPACE,
            **init,
        )
    else:
        ray.init(address=settings.ray_address, namespace=NAMESPACE, **init)


def deploy(settings: Settings, *, heartbeat_s: float = 1.0, lost_after_s: float = 5.0) -> Fleet:
    """Deploy board, workers and gateway on the Ray this process is connected to; Serve's HTTP
    proxy listens on settings.host:settings.port."""
    quiet_ray_env()
    import ray
    from ray import serve

    from earshot.fleet.board import BOARD_NAME, Board
    from earshot.fleet.gateway import gateway_deployment
    from earshot.fleet.worker import worker_deployment

    serve.start(http_options={"host": settings.host, "port": settings.port})
    board = (
        ray.remote(Board)
        .options(name=BOARD_NAME, namespace=NAMESPACE, num_cpus=0, max_concurrency=1000)
        .remote(size=settings.events_buffer_size, lost_after=lost_after_s)
    )
    workers = worker_deployment(settings).bind(settings, board, heartbeat_s)
    gateway = gateway_deployment(settings).bind(settings, workers, board)
    handle = serve.run(gateway, name=APP_NAME, route_prefix="/")
    return Fleet(handle=handle, board=board, settings=settings)


def stop(fleet: Fleet | None = None) -> None:
    """Delete the app, stop Serve, kill the board (when given), disconnect from Ray."""
    import ray
    from ray import serve

    try:
        serve.shutdown()  # type: ignore[no-untyped-call]
    finally:
        if fleet is not None:
            with contextlib.suppress(Exception):  # already gone with its owner
                ray.kill(fleet.board)
        ray.shutdown()


def run_fleet(settings: Settings) -> int:
    """The `earshot fleet` command."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    start_ray(settings)
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
        stop(fleet)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _scale(settings: Settings) -> str:
    if settings.fleet_min_workers is not None:
        return f"{settings.fleet_min_workers}..{settings.fleet_max_workers}, autoscaled"
    return str(settings.fleet_workers)
