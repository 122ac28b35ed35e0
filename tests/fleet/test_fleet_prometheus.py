"""Debian's Prometheus against the real fleet (tests/fleet/conftest.py: a 2-node Ray cluster on
loopback, the gateway and 2 workers of 1 model each), its head node running Ray's dashboard (on
127.0.0.1), whose reporter writes Ray's Prometheus service-discovery file. The §5 metrics of every
worker go through Ray's metrics agents and that file and arrive under their §5 names with a
`worker` label. Prometheus runs the shipped deploy/prometheus-fleet.yml, only pointed at this
cluster's discovery file and scraping every second; Ray's workers report every second
(metrics_report_interval_ms).

Traffic, through the gateway with the official openai SDK: tiny.en and base alternated (each loads
once, on a worker of its own, and hits after), then twice: both unloaded (`DELETE /api/ps/{id}`,
a manual eviction on each worker) and both asked for again (reloads). The loads it caused are read
from the fleet's own record (`/api/events`, model_loaded), not assumed. Then:
- `sum(earshot_model_loads_total)` over workers equals those loads, per worker too, and no
  `ray_earshot_*` name is left after relabeling;
- the state gauges show what each worker holds;
- every dashboard panel query over worker metrics returns data for each worker alone
  ($worker = that worker); the fleet panels return one series per worker with All.
Panels over metrics the workers do not export (the gateway's HTTP metrics, realtime sessions,
audio decoding, GPU, `up`) are left out and listed (GATEWAY_ONLY) so that leaving one out is
deliberate.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from earshot.fleet.run import free_port
from tests.fleet.conftest import LOAD_TIMEOUT_S, FleetServer, start_fleet_server
from tests.ops.known_metrics import WORKER_METRICS, resolve
from tests.ops.promql_check import metric_names
from tests.ops.test_dashboards import VARIABLE, all_panels
from tests.support.stack import ManagedProcess, find_executable, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "earshot-model-cache.json"
FLEET_CONFIG = REPO / "deploy" / "prometheus-fleet.yml"
TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
# Worker processes push their metrics to their node's agent at this interval (Ray's floor is 1000 ms).
REPORT_INTERVAL_MS = 1000
ROUNDS = 2
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
# The windows the panels' queries get: wide enough to hold all of the test's traffic.
BUILTINS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "10m",
    "__range_s": "600",
    "__range_ms": "600000",
    "__interval_ms": "60000",
}
# Panels whose queries read no worker metric: the gateway's (HTTP, realtime, decoding), the GPU
# sampler's and Prometheus's own.
GATEWAY_ONLY = {
    "Instance up",
    "GPU memory used / total",
    "GPU memory: earshot's share and total use",
    "GPU utilization",
    "Requests per second by route",
    "Request latency p95 by route",
    "Error rate (5xx) by route",
    "Realtime sessions open",
    "Audio decode failures",
}
FLEET_PANELS = {
    "Models per worker",
    "Loads and evictions per worker (per minute)",
    "Requests per worker (per minute)",
}


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        result = body["data"]["result"]
        return list(result) if body["data"]["resultType"] == "vector" else [{"metric": {}, "value": result}]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])


def fleet_config(sd_file: Path) -> dict[str, Any]:
    """deploy/prometheus-fleet.yml as shipped, pointed at `sd_file`, scraping every second."""
    config = yaml.safe_load(FLEET_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str((FLEET_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "earshot-fleet"]
    (sd,) = job["file_sd_configs"]
    sd["files"] = [str(sd_file)]
    sd["refresh_interval"] = "1s"
    return config


@pytest.fixture(scope="module")
def fleet_server(models_dir: Path) -> Iterator[FleetServer]:
    """This module's fleet: the conftest's, with the dashboard on and a 1 s metrics report."""
    with start_fleet_server(
        models_dir, dashboard=True, system_config={"metrics_report_interval_ms": REPORT_INTERVAL_MS}
    ) as server:
        yield server


@pytest.fixture(scope="module")
def workers(fleet_server: FleetServer) -> set[str]:
    found = {w["worker"] for w in fleet_server.get("/api/ps")["workers"]}
    assert len(found) == 2, found
    return found


@pytest.fixture(scope="module")
def agents(fleet_server: FleetServer) -> set[str]:
    """The metrics agents of the cluster's nodes (host:port), as Ray lists them."""
    import ray

    return {
        f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"
        for n in ray.nodes()
        if n.get("Alive", n.get("alive"))
    }


def discovery_file(temp_dir: Path) -> Path | None:
    """Ray's service-discovery file: in the node's temp dir (a link into the session dir)."""
    for path in (
        temp_dir / DISCOVERY_FILE,
        temp_dir / "ray" / DISCOVERY_FILE,
        *temp_dir.glob(f"session_*/{DISCOVERY_FILE}"),
    ):
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def prometheus(
    fleet_server: FleetServer, agents: set[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    run_dir = tmp_path_factory.mktemp("prometheus-fleet")
    sd_file = wait_until(
        lambda: discovery_file(Path(fleet_server.temp_dir)), 60, "Ray's service-discovery file"
    )
    config = run_dir / "prometheus.yml"
    config.write_text(yaml.safe_dump(fleet_config(sd_file)))
    port = free_port()
    process = ManagedProcess(
        "prometheus",
        [
            find_executable("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={run_dir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}",
        ],
        run_dir / "prometheus.log",
    )
    process.start()
    try:
        prom = Prometheus(f"http://{LOOPBACK}:{port}")

        def ready() -> bool:
            try:
                return httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, "Prometheus ready")

        def listed() -> set[str]:
            try:
                return set(json.loads(sd_file.read_text())[0]["targets"])
            except (OSError, ValueError, IndexError, KeyError):
                return set()

        # Ray lists every node's metrics agent (the second node within its 5 s rewrite).
        wait_until(lambda: agents <= listed(), 60, lambda: f"Ray's file lists {agents}: {listed()}")
        # Every node's metrics agent is a target and answers.
        for agent in sorted(agents):
            wait_until(
                lambda agent=agent: prom.value(f'up{{job="earshot-fleet", instance="{agent}"}}') == 1,
                60,
                f"Prometheus scraping the metrics agent {agent}",
            )

        # Prometheus scrapes what Ray's file lists, all of it this cluster's (ports chosen free).
        def discovered() -> set[str]:
            data = httpx.get(f"{prom.url}/api/v1/targets", timeout=10).json()["data"]
            return {
                t["labels"]["instance"]
                for t in data["activeTargets"]
                if t["labels"]["job"] == "earshot-fleet"
            }

        wait_until(lambda: discovered() == listed(), 30, "Prometheus's targets = Ray's file")
        # Not Ray's fixed autoscaler/dashboard metrics ports, which another Ray on the machine may hold.
        assert not listed() & {f"{LOOPBACK}:44217", f"{LOOPBACK}:44227"}, listed()
        yield prom
    finally:
        process.stop()
        log = process.log_tail(3000)
        assert not process.group_exists(), f"Prometheus left running\n{log}"


def _loads(server: FleetServer) -> Counter[str]:
    """model_loaded records of the fleet's event log, per worker."""
    return Counter(e["worker"] for e in server.events() if e["event"] == "model_loaded")


@pytest.fixture(scope="module")
def traffic(fleet_server: FleetServer, prometheus: Prometheus, jfk_flac: Path) -> Counter[str]:
    """The traffic of the module doc; returns the loads it caused, per worker (the fleet's record)."""
    assert not _loads(fleet_server), "the fleet loaded models before the test's traffic"
    client = openai.OpenAI(
        base_url=fleet_server.url + "/v1", api_key="unused", max_retries=0, timeout=LOAD_TIMEOUT_S + 30
    )
    audio = jfk_flac.read_bytes()

    def transcribe(model: str) -> None:
        text = client.audio.transcriptions.create(model=model, file=("jfk.flac", audio)).text
        assert "country" in text.lower(), (model, text)

    for model in (TINY, BASE, TINY, BASE):  # a load each, then a hit each
        transcribe(model)
    # Twice: a histogram series is born with its first observation, so rate() over the
    # eviction histograms needs a second one to see an increase.
    for _ in range(ROUNDS):
        for model in (TINY, BASE):  # a manual eviction on the worker that holds it
            response = httpx.delete(f"{fleet_server.url}/api/ps/{model}", timeout=60)
            assert response.status_code == 200, response.text
        for model in (TINY, BASE):  # a reload each
            transcribe(model)
    # The fleet's record: the workers push their events to the board every heartbeat.
    expected = 2 + 2 * ROUNDS
    wait_until(lambda: sum(_loads(fleet_server).values()) >= expected, 30, "the loads in /api/events")
    loads = _loads(fleet_server)
    assert sum(loads.values()) == expected, loads
    return loads


def samples(prom: Prometheus, expr: str) -> dict[str, float]:
    return {r["metric"].get("worker", ""): float(r["value"][1]) for r in prom.query(expr)}


def test_loads_summed_over_workers_equal_the_loads_caused(
    fleet_server: FleetServer,
    prometheus: Prometheus,
    traffic: Counter[str],
    workers: set[str],
    agents: set[str],
) -> None:
    expected = sum(traffic.values())
    wait_until(
        lambda: prometheus.value("sum(earshot_model_loads_total)") == expected,
        90,
        lambda: (
            f"sum(earshot_model_loads_total) == {expected}: {prometheus.value('sum(earshot_model_loads_total)')}"
        ),
    )
    assert prometheus.value("sum(earshot_model_loads_total)") == expected
    assert prometheus.value('sum(earshot_model_loads_total{outcome="success"})') == expected
    per_worker = samples(prometheus, "sum by (worker) (earshot_model_loads_total)")
    assert per_worker == {w: float(n) for w, n in traffic.items()}
    assert set(traffic) <= workers
    # The names are the §5 ones: nothing left under Ray's prefix, no doubled _total.
    assert prometheus.query('count({__name__=~"ray_earshot_.*|earshot_.*_total_total"})') == []
    # Every metric a worker exports arrived, with worker, node and instance (the node's agent).
    for name in sorted(WORKER_METRICS):
        series_name = name if resolve(name) is not None else f"{name}_count"
        result = prometheus.query(f"{series_name}")
        assert result, f"{series_name}: no series"
        for r in result:
            labels = r["metric"]
            assert labels.get("worker") in workers, labels
            assert labels.get("node") == LOOPBACK, labels
            assert labels["instance"] in agents, labels
            assert labels["job"] == "earshot-fleet", labels
            assert "otel_scope_name" not in labels, labels


def test_state_gauges_show_what_each_worker_holds(
    fleet_server: FleetServer, prometheus: Prometheus, traffic: Counter[str], workers: set[str]
) -> None:
    held = {m["model"]: m["worker"] for m in fleet_server.get("/api/ps")["models"]}
    assert set(held) == {TINY, BASE}, held
    for model, worker in held.items():

        def current(worker: str = worker, model: str = model) -> bool:
            loaded = samples(prometheus, f'earshot_model_loaded{{worker="{worker}", model="{model}"}}')
            return loaded == {worker: 1.0}

        wait_until(current, 30, f"earshot_model_loaded on {worker}")
        memory = samples(
            prometheus, f'sum by (worker) (earshot_model_memory_bytes{{worker="{worker}", model="{model}"}})'
        )
        assert memory[worker] > 0
    for worker in workers:
        # One model per worker: what a worker does not hold reads 0, not 1.
        holds = {m for m, w in held.items() if w == worker}
        ones = samples(prometheus, f'sum by (worker) (earshot_model_loaded{{worker="{worker}"}})')
        assert ones == {worker: float(len(holds))}, (worker, ones, holds)
        assert samples(prometheus, f'earshot_cache_capacity_models{{worker="{worker}"}}') == {worker: 1.0}
        # No memory budget: +Inf on a single server; Ray drops non-finite values, so the fleet
        # exports the largest float instead (fleet/metrics.py UNLIMITED).
        assert samples(prometheus, f'earshot_cache_memory_budget_bytes{{worker="{worker}"}}') == {
            worker: sys.float_info.max
        }


def fill(expr: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTINS:
            return BUILTINS[name]
        return values[name]

    return VARIABLE.sub(value, expr)


def promql_regex(value: str) -> str:
    return re.sub(r"([.+*?^$()\[\]{}|\\])", r"\\\\\1", value)


def worker_targets() -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every dashboard target that reads worker metrics."""
    dashboard = json.loads(DASHBOARD.read_text())
    seen = set()
    for panel in all_panels(dashboard):
        targets = panel.get("targets", [])
        if not targets:
            continue
        seen.add(panel["title"])
        if panel["title"] in GATEWAY_ONLY:
            continue
        for target in targets:
            names = metric_names(fill(target["expr"], {"instance": ".*", "worker": ".*", "model": ".*"}))
            bases = {(s.metric.name if (s := resolve(n)) else n) for n in names}
            assert bases <= WORKER_METRICS, (
                f"{panel['title']}: {sorted(bases - WORKER_METRICS)} not from a worker"
            )
            yield panel["title"], target["refId"], target["expr"]
    assert seen >= GATEWAY_ONLY, f"GATEWAY_ONLY names panels the dashboard lacks: {GATEWAY_ONLY - seen}"


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


def test_every_panel_returns_data_per_worker(
    prometheus: Prometheus, traffic: Counter[str], workers: set[str]
) -> None:
    targets = list(worker_targets())
    assert len(targets) >= 20
    missing: list[str] = []
    deadline = time.monotonic() + 60
    for worker in sorted(workers):
        values = {"instance": ".*", "worker": promql_regex(worker), "model": ".*", "datasource": "prometheus"}
        for title, ref, expr in targets:
            query = fill(expr, values)
            while not (ok := has_data(prometheus.query(query))) and time.monotonic() < deadline:
                time.sleep(1)
            if not ok:
                missing.append(f"worker {worker}: {title!r} {ref}: {query}")
    assert not missing, "panel queries without data:\n" + "\n".join(missing)
    # With All, the fleet panels show each worker as its own series.
    everyone = {"instance": ".*", "worker": ".*", "model": ".*"}
    for title, ref, expr in targets:
        if title in FLEET_PANELS:
            result = prometheus.query(fill(expr, everyone))
            assert {r["metric"].get("worker") for r in result} == workers, (title, ref)
