"""Debian's Prometheus against a real fleet: the §5 metrics of every worker, through Ray's metrics
agent and Ray's service-discovery file, under their §5 names with a `worker` label.

The fleet (tests/fleet/obs_cluster.py): one Ray node on loopback, two workers (Serve replicas)
each with a real ModelCache (max_models=1, faster-whisper) and FleetMetrics. Prometheus runs the
shipped deploy/prometheus-fleet.yml, only pointed at this cluster's service-discovery file and
scraping every second.

Traffic, the same on both workers with the two models swapped: a load (miss), a hit, then twice:
the other model (a capacity eviction and a load), a manual unload of it, the first model again (a
reload, a load). So each worker has loaded 5 times and holds its first model, idle, with an
expiry scheduled. Then:
- `sum(earshot_model_loads_total)` over workers is 10, 5 per worker, and no `ray_earshot_*` name is
  left after relabeling;
- the state gauges show what each worker holds (the unloaded model reads 0, not 1);
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from earshot.audio.decode import decode_audio
from tests.fleet.obs_cluster import LOOPBACK, ObsFleet, free_port, obs_fleet  # first: Ray's environment
from tests.ops.known_metrics import WORKER_METRICS, resolve
from tests.ops.promql_check import metric_names
from tests.ops.test_dashboards import VARIABLE, all_panels
from tests.support.stack import ManagedProcess, find_executable, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "earshot-model-cache.json"
FLEET_CONFIG = REPO / "deploy" / "prometheus-fleet.yml"
TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
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
LOADS_PER_WORKER = 5


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
def fleet(models_dir: Path) -> Iterator[ObsFleet]:
    with obs_fleet(models_dir, max_models=1) as f:
        yield f


@pytest.fixture(scope="module")
def prometheus(fleet: ObsFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    run_dir = tmp_path_factory.mktemp("prometheus-fleet")
    wait_until(fleet.service_discovery_file.is_file, 60, "Ray's service-discovery file")
    config = run_dir / "prometheus.yml"
    config.write_text(yaml.safe_dump(fleet_config(fleet.service_discovery_file)))
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
        # The node's metrics agent is a target (from Ray's file) and answers.
        agent = f"{LOOPBACK}:{fleet.metrics_port}"
        wait_until(
            lambda: prom.value(f'up{{job="earshot-fleet", instance="{agent}"}}') == 1,
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

        def listed() -> set[str]:
            return set(json.loads(fleet.service_discovery_file.read_text())[0]["targets"])

        wait_until(lambda: discovered() == listed(), 30, "Prometheus's targets = Ray's file")
        assert agent in listed()
        # Not Ray's fixed autoscaler/dashboard metrics ports, which another Ray on the machine may hold.
        assert not listed() & {f"{LOOPBACK}:44217", f"{LOOPBACK}:44227"}, listed()
        yield prom
    finally:
        process.stop()
        log = process.log_tail(3000)
        assert not process.group_exists(), f"Prometheus left running\n{log}"


@pytest.fixture(scope="module")
def traffic(fleet: ObsFleet, prometheus: Prometheus, jfk_flac: Path) -> dict[str, str]:
    """The traffic of the module doc; returns deployment -> the model it holds at the end."""
    pcm = decode_audio(jfk_flac)
    first = {"obs-a": TINY, "obs-b": BASE}
    for name, model in first.items():
        other = BASE if model == TINY else TINY
        handle = fleet.handles[name]

        def transcribe(m: str, handle: Any = handle) -> str:
            return str(handle.transcribe.remote(m, pcm).result(timeout_s=300))

        assert "country" in transcribe(model).lower()  # miss: load 1
        transcribe(model)  # hit
        # Twice: a histogram series is born with its first observation, so rate() over the
        # eviction histograms needs a second one to see an increase.
        for _ in range(2):
            assert "country" in transcribe(other).lower()  # capacity eviction, a load
            assert handle.unload.remote(other).result(timeout_s=60) == "unloaded"  # manual eviction
            transcribe(model)  # a reload (a load)
        assert handle.loaded.remote().result(timeout_s=30) == [model]
    return first


def samples(prom: Prometheus, expr: str) -> dict[str, float]:
    return {r["metric"].get("worker", ""): float(r["value"][1]) for r in prom.query(expr)}


def test_loads_summed_over_workers_equal_the_loads_caused(
    fleet: ObsFleet, prometheus: Prometheus, traffic: dict[str, str]
) -> None:
    expected = LOADS_PER_WORKER * len(fleet.workers)
    wait_until(
        lambda: prometheus.value("sum(earshot_model_loads_total)") == expected,
        90,
        f"sum(earshot_model_loads_total) == {expected}",
    )
    assert prometheus.value("sum(earshot_model_loads_total)") == expected
    assert prometheus.value('sum(earshot_model_loads_total{outcome="success"})') == expected
    per_worker = samples(prometheus, "sum by (worker) (earshot_model_loads_total)")
    assert per_worker == {w: LOADS_PER_WORKER for w in fleet.workers.values()}
    # The names are the §5 ones: nothing left under Ray's prefix, no doubled _total.
    assert prometheus.query('count({__name__=~"ray_earshot_.*|earshot_.*_total_total"})') == []
    # Every metric a worker exports arrived, with worker, node and instance (the node's agent).
    agent = f"{LOOPBACK}:{fleet.metrics_port}"
    for name in sorted(WORKER_METRICS):
        series_name = name if resolve(name) is not None else f"{name}_count"
        result = prometheus.query(f"{series_name}")
        assert result, f"{series_name}: no series"
        for r in result:
            labels = r["metric"]
            assert labels.get("worker") in fleet.workers.values(), labels
            assert labels.get("node") == LOOPBACK, labels
            assert labels["instance"] == agent, labels
            assert labels["job"] == "earshot-fleet", labels
            assert "otel_scope_name" not in labels, labels


def test_state_gauges_show_what_each_worker_holds(
    fleet: ObsFleet, prometheus: Prometheus, traffic: dict[str, str]
) -> None:
    for name, held in traffic.items():
        worker = fleet.workers[name]
        other = BASE if held == TINY else TINY

        def current(worker: str = worker, held: str = held, other: str = other) -> bool:
            loaded = samples(prometheus, f'earshot_model_loaded{{worker="{worker}", model="{held}"}}')
            gone = samples(prometheus, f'earshot_model_loaded{{worker="{worker}", model="{other}"}}')
            return loaded == {worker: 1.0} and gone == {worker: 0.0}

        wait_until(current, 30, f"earshot_model_loaded on {worker}")
        # The unloaded model holds no memory and no references any more.
        assert samples(
            prometheus, f'sum by (worker) (earshot_model_memory_bytes{{worker="{worker}", model="{other}"}})'
        ) in (
            {},
            {worker: 0.0},
        )
        memory = samples(
            prometheus, f'sum by (worker) (earshot_model_memory_bytes{{worker="{worker}", model="{held}"}})'
        )
        assert memory[worker] > 0
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
    fleet: ObsFleet, prometheus: Prometheus, traffic: dict[str, str]
) -> None:
    targets = list(worker_targets())
    assert len(targets) >= 20
    missing: list[str] = []
    deadline = time.monotonic() + 60
    for worker in fleet.workers.values():
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
            assert {r["metric"].get("worker") for r in result} == set(fleet.workers.values()), (title, ref)
