"""A minimal real fleet for the observability tests: one Ray node on loopback and two Serve
deployments of one replica each (`obs-a`, `obs-b`), each replica owning a real `ModelCache` with
the real faster-whisper backend and a `FleetMetrics`.

One replica per deployment (not two replicas of one) so that the test decides which worker serves
which request: the metrics path under test (cache events -> Ray metrics -> the node's metrics
agent -> Prometheus) is the same as in the fleet, routing is not what is tested here.

Network: everything on 127.0.0.1. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is what makes Ray keep
127.0.0.1 (without it `ray.init(_node_ip_address="127.0.0.1")` is rewritten to the machine's
outward address and the metrics agent listens on 0.0.0.0); every port is picked free here (the
dashboard agent's default, 52365, is fixed, and so are the autoscaler's and the dashboard's
metrics ports, 44217 and 44227, unless AUTOSCALER_METRIC_PORT / DASHBOARD_METRIC_PORT say); the dashboard runs on 127.0.0.1 because its reporter
module is what writes Ray's Prometheus service-discovery file. Serve runs without its HTTP proxy.
Every Ray process is stopped at the end (see `obs_fleet`), and the fixture checks that none of
the processes the node started is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
# Worker processes push their metrics to the agent at this interval (Ray's floor is 1000 ms).
REPORT_INTERVAL_MS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def quiet_ray_env() -> None:
    """The environment of every Ray in these tests. Ray reads it when it is first imported (a
    driver that imported Ray before keeps its own view: a driver in another auth mode than the
    cluster retries its GCS connection for ever), so this runs when this module is imported, and
    the test modules import this module before anything that imports Ray."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep 127.0.0.1 (see the module doc)
    # Ray 2.60's `ray start` turns token authentication on, while a driver connecting by address
    # does not by default (it then fails to connect). A loopback-only test cluster goes without.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Replicas import this module (ObsWorker) by name: the node's processes inherit the path.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, paths)])


quiet_ray_env()  # at import: see the docstring


class ObsWorker:
    """A fleet worker reduced to what the metrics need: a ModelCache + LocalInference + FleetMetrics."""

    async def __init__(self, models_dir: str, max_models: int) -> None:  # type: ignore[misc]
        import ray
        from opentelemetry import trace
        from ray import serve

        from earshot.backends import default_backends
        from earshot.cache.manager import ModelCache
        from earshot.cache.state import CacheConfig
        from earshot.fleet.metrics import FleetMetrics
        from earshot.inference.local import LocalInference
        from earshot.inference.workers import Workers
        from earshot.models.catalog import build_catalog

        self.worker = serve.get_replica_context().replica_tag
        self.metrics = FleetMetrics(worker=self.worker, node=str(ray.util.get_node_ip_address()))
        catalog = build_catalog(models_dir=Path(models_dir), builtin_hub_models=False)
        backends = default_backends("cpu", "int8", cpu_threads=1)
        self.workers = Workers(1)
        self.cache = ModelCache(
            catalog.resolve,
            backends,
            CacheConfig(idle_timeout=3600, max_models=max_models, load_timeout=300, thrash_window=3600),
            observers=[self.metrics.observer],
            runner=self.workers.load_runner,
        )
        self.inference = LocalInference(
            self.cache,
            catalog.resolve,
            backends,
            self.workers,
            tracer=trace.get_tracer("earshot-test"),
            record=self.metrics.record_inference,
        )
        self.metrics.start(self.cache.snapshot, 0.5)

    async def whoami(self) -> str:
        return self.worker

    async def transcribe(self, model: str, pcm: Any) -> str:
        from earshot.options import TranscribeOptions

        transcript = await self.inference.transcribe(model, pcm, TranscribeOptions())
        return str(transcript.text)

    async def unload(self, model: str) -> str:
        return str(await self.inference.unload(model))

    async def loaded(self) -> list[str]:
        return [m.id for m in self.cache.snapshot().models if m.loaded]

    async def __del__(self) -> None:
        self.metrics.stop()
        await self.cache.close()


@dataclass
class ObsFleet:
    temp_dir: Path
    metrics_port: int
    handles: dict[str, Any] = field(default_factory=dict)  # deployment name -> handle
    workers: dict[str, str] = field(default_factory=dict)  # deployment name -> worker (replica id)

    @property
    def service_discovery_file(self) -> Path:
        return self.temp_dir / "prom_metrics_service_discovery.json"


def descendants(proc: psutil.Popen | psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [proc, *proc.children(recursive=True)]
    return []


@contextlib.contextmanager
def obs_fleet(models_dir: Path, *, max_models: int = 1) -> Iterator[ObsFleet]:
    """`ray start --head --block` on 127.0.0.1 (its own temp dir and ports: `ray start` writes the
    cluster address only into its --temp-dir, where ray.cluster_utils would write the machine-wide
    /tmp/ray/ray_current_cluster), the driver connected to it, the two workers deployed. At the end:
    Serve and the driver shut down, the `ray start` process stopped (with --block it stops the
    node's processes), and every process of the node it had started killed by pid if still there."""
    quiet_ray_env()
    import ray
    from ray import serve

    temp_dir = Path(tempfile.mkdtemp(prefix="ray-fo-", dir="/tmp"))  # short: unix socket paths
    fleet = ObsFleet(temp_dir=temp_dir, metrics_port=free_port())
    gcs_port = free_port()
    argv = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={LOOPBACK}",
        f"--port={gcs_port}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={fleet.metrics_port}",
        f"--runtime-env-agent-port={free_port()}",
        f"--system-config={json.dumps({'metrics_report_interval_ms': REPORT_INTERVAL_MS})}",
    ]
    # The autoscaler's and the dashboard's own metrics ports are fixed (44217, 44227) unless these
    # say otherwise; Ray lists them in its service-discovery file, so with another Ray on the
    # machine Prometheus would scrape that one's.
    env = {
        **os.environ,
        "AUTOSCALER_METRIC_PORT": str(free_port()),
        "DASHBOARD_METRIC_PORT": str(free_port()),
    }
    log = (temp_dir / "ray-start.log").open("wb")
    head = psutil.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    started: dict[int, psutil.Process] = {}
    try:
        address = f"{LOOPBACK}:{gcs_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=address, namespace="earshot-obs-test", log_to_driver=False)
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        started.update({p.pid: p for p in descendants(head)})
        serve.start(http_options={"location": "NoServer"})
        deployment = serve.deployment(ObsWorker).options(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
        for name in ("obs-a", "obs-b"):
            app = deployment.options(name=name).bind(str(models_dir), max_models)
            fleet.handles[name] = serve.run(app, name=name, route_prefix=None)
            fleet.workers[name] = fleet.handles[name].whoami.remote().result(timeout_s=120)
        started.update({p.pid: p for p in descendants(head)})
        yield fleet
    finally:
        started.update({p.pid: p for p in descendants(head)})
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the node's processes
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(60)
        deadline = time.monotonic() + 30
        while (
            left := [p for p in started.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        for proc in left:  # processes of this node, by pid
            with contextlib.suppress(psutil.Error):
                proc.kill()
        log.close()
        tail = (temp_dir / "ray-start.log").read_text(errors="replace")[-3000:]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {[(p.pid, p.name()) for p in left]}\n{tail}"
