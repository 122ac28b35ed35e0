"""The Grafana dashboard against a live earshot and a real Prometheus scraping it.

(a) every metric the dashboard's queries select, and every metric tests/ops/known_metrics.py lists,
is in earshot's live /metrics after real traffic; (b) every panel query, with its template
variables filled in as Grafana would, returns data from Prometheus.

The traffic (on the e2e stack's earshot, max_models=1) creates every series a panel needs: a hit
and misses, a Kokoro speech request (evicting Whisper: `capacity`), a failed load of the broken
model (503: loads outcome=failure, earshot_http_requests_error_total), a manual unload
(`manual`), and a reload of faster-whisper-tiny.en, which stays loaded (the "Loaded models" table,
idle / expiry gauges). Prometheus scrapes every second, so every series has samples within the
queries' `[1m]` window a few seconds later; the test polls until the queries answer.

GPU: on a machine without NVML, earshot exports earshot_gpu_available 0 and no other
earshot_gpu_* series (DESIGN.md §5), so the GPU panels' queries of those series (GPU memory used /
total, earshot's share, GPU utilization target A) are empty there; the test asserts exactly that
(and that earshot_gpu_available is 0). With NVML present they must have data like the others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import BASE, BROKEN, KOKORO, TINY
from tests.ops.known_metrics import BY_NAME, METRICS, exposition_names, resolve
from tests.ops.promql_check import metric_names
from tests.ops.test_dashboards import VARIABLE, all_panels, variable_query, variables
from tests.support.stack import REPO, Stack, wait_until

pytestmark = pytest.mark.e2e

DASHBOARD = REPO / "dashboards" / "earshot-model-cache.json"
# Grafana's built-in variables as the test fills them in (1 s scrapes: a 1m rate window holds ~60
# samples; 5m covers all of the test's traffic).
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
    "__interval_ms": "60000",
}
GPU_AVAILABLE = "earshot_gpu_available"
# Series only an NVML sampler with a GPU exports.
GPU_SERIES = frozenset(
    m.name for m in METRICS if m.name.startswith("earshot_gpu_") and m.name != GPU_AVAILABLE
)
DATA_TIMEOUT = 60


@dataclass(frozen=True)
class Query:
    panel: str  # title
    ref: str  # refId
    model: str  # the value of $model
    expr: str  # with the variables filled in

    @property
    def where(self) -> str:
        return f"{self.panel!r} {self.ref} (model {self.model})"

    @property
    def gpu_only(self) -> bool:
        names = {(s.metric.name if (s := resolve(n)) else n) for n in metric_names(self.expr)}
        return bool(names & GPU_SERIES)


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def promql_regex(value: str) -> str:
    """`value` as a literal regex inside a PromQL double-quoted string (Grafana escapes the values
    of multi-value variables the same way)."""
    return re.sub(r"([.+*?^$()\[\]{}|\\])", r"\\\\\1", value)


def fill(expr: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in values:
            return values[name]
        raise AssertionError(f"undefined variable ${name} in {expr!r}")

    return VARIABLE.sub(value, expr)


def panel_queries(instance: str, model: str) -> list[Query]:
    """Every panel target of the dashboard with $instance and $model (a regex: ".*" is All)."""
    values = {"instance": instance, "worker": ".*", "model": model, "datasource": "prometheus"}
    out = []
    for panel in all_panels(load_dashboard()):
        for target in panel.get("targets", []):
            out.append(Query(panel["title"], target["refId"], model, fill(target["expr"], values)))
    return out


def live_sample_names(stack: Stack) -> dict[str, float]:
    """Sample name -> the last value seen, from earshot's /metrics."""
    text = httpx.get(stack.earshot_url + "/metrics", timeout=10).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def transcribe(client: httpx.Client, model: str, audio: bytes) -> httpx.Response:
    return client.post(
        "/v1/audio/transcriptions", files={"file": ("clip.wav", audio, "audio/wav")}, data={"model": model}
    )


@pytest.fixture(scope="module")
def traffic(stack: Stack, clip_wav: bytes) -> None:
    with httpx.Client(base_url=stack.earshot_url, timeout=120) as client:
        assert transcribe(client, TINY, clip_wav).status_code == 200
        assert transcribe(client, TINY, clip_wav).status_code == 200  # a hit
        speech = client.post(
            "/v1/audio/speech",
            json={"model": KOKORO, "input": "Hello world.", "voice": "alloy", "response_format": "wav"},
        )
        assert speech.status_code == 200, speech.text  # evicts tiny.en: capacity
        failed = transcribe(client, BROKEN, clip_wav)
        assert failed.status_code == 503, failed.text
        assert failed.json()["error"]["code"] == "model_load_failed"
        assert transcribe(client, BASE, clip_wav).status_code == 200
        unload = client.delete(f"/api/ps/{BASE}")
        assert unload.status_code == 200, unload.text  # manual
        assert transcribe(client, TINY, clip_wav).status_code == 200  # a reload; stays loaded
        loaded = [m["model"] for m in client.get("/api/ps").json()["models"]]
        assert loaded == [TINY]


def gpu_available(stack: Stack) -> bool:
    return live_sample_names(stack)[GPU_AVAILABLE] == 1


def test_live_metrics_cover_the_dashboard_and_the_known_metrics(stack: Stack, traffic: None) -> None:
    live = live_sample_names(stack)
    with_gpu = live[GPU_AVAILABLE] == 1
    skipped = set() if with_gpu else GPU_SERIES

    def names_of(metric_name: str) -> set[str]:
        kind = BY_NAME[metric_name].kind
        if kind == "histogram":
            return {metric_name + suffix for suffix in ("_bucket", "_sum", "_count")}
        return {metric_name}

    # Every series name a dashboard query selects (`up` is Prometheus's own: checked in (b)).
    dashboard = load_dashboard()
    used: set[str] = set()
    for query in panel_queries(".*", ".*"):
        used |= metric_names(query.expr)
    for var in variables(dashboard).values():
        if var["type"] == "query":
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", variable_query(var))
            assert inner, var["name"]
            used |= metric_names(fill(inner.group(1), {"instance": ".*"}))
    used.discard("up")
    gpu_used = {n for n in used if (s := resolve(n)) is not None and s.metric.name in skipped}
    assert sorted(used - gpu_used - set(live)) == []

    # Every metric of known_metrics.py (GPU series only with a GPU).
    expected = exposition_names() - {n for name in skipped for n in names_of(name)}
    assert sorted(expected - set(live)) == []
    # ... and nothing earshot exports is missing from the list.
    ours = {n for n in live if n.startswith("earshot_")}
    assert sorted(ours - exposition_names(created=True)) == []
    if not with_gpu:
        assert live[GPU_AVAILABLE] == 0
        gpu_live = {n for n in live if (s := resolve(n)) is not None and s.metric.name in GPU_SERIES}
        assert gpu_live == set()


def test_every_dashboard_query_returns_data(stack: Stack, traffic: None) -> None:
    instance = stack.earshot_instance
    with_gpu = gpu_available(stack)

    # The template variables' own queries find this instance and its models.
    assert instance in stack.label_values("instance", "earshot_cache_capacity_models")
    models = stack.label_values("model", f'earshot_model_loads_total{{instance=~"{instance}"}}')
    assert {TINY, BASE, KOKORO, BROKEN} <= set(models)

    # $model as "All" (Grafana's allValue ".*") and as one model, escaped as Grafana does.
    queries = panel_queries(instance, ".*") + panel_queries(instance, promql_regex(TINY))
    expect_data = [q for q in queries if with_gpu or not q.gpu_only]
    expect_empty = [q for q in queries if q not in expect_data]
    results: dict[Query, list] = {}

    def all_answer() -> bool:
        for query in expect_data:
            if not results.get(query):
                results[query] = stack.query(query.expr)
        return all(results[q] for q in expect_data)

    wait_until(
        all_answer,
        DATA_TIMEOUT,
        lambda: "no data for:\n" + "\n".join(f"{q.where}: {q.expr}" for q in expect_data if not results[q]),
        interval=1,
    )
    for query in expect_empty:
        assert stack.query(query.expr) == [], f"{query.where}: data without a GPU: {query.expr}"
    if not with_gpu:
        assert stack.query_value(f'max({GPU_AVAILABLE}{{instance=~"{instance}"}})') == 0
        assert {(q.panel, q.ref) for q in expect_empty} == {
            ("GPU memory used / total", "A"),
            ("GPU memory used / total", "B"),
            ("GPU memory: earshot's share and total use", "A"),
            ("GPU memory: earshot's share and total use", "B"),
            ("GPU utilization", "A"),
        }

    print(f"\n{len(expect_data)} dashboard queries returned data, {len(expect_empty)} (GPU) empty:")
    for query in queries:
        values = [r["value"][1] for r in results.get(query, [])]
        print(f"  {query.where}: {values if query in results else 'empty (no GPU)'}")
