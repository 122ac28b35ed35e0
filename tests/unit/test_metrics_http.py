"""HTTP request metrics: Litestar's Prometheus middleware, with its metrics on our registry only."""

from __future__ import annotations

from typing import Any, cast

import anyio
import anyio.to_thread
import pytest
from litestar import Litestar, get
from litestar.connection import Request
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from litestar.plugins.prometheus import PrometheusMiddleware
from litestar.testing import TestClient
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from earshot.api.metrics import metrics_handler
from earshot.observability.http_metrics import (
    UNMATCHED_PATH,
    RegistryPrometheusMiddleware,
    http_metrics_config,
)


@get("/v1/models/{model_id:path}", sync_to_thread=False)
def model(model_id: FromPath[str]) -> dict[str, str]:
    if model_id.strip("/") != "known":
        raise NotFoundException(f"no model {model_id}")
    return {"id": model_id}


@get("/boom", sync_to_thread=False)
def boom() -> None:
    raise RuntimeError("bug")


async def _in_worker(fn: Any, arg: Any) -> bytes:
    return cast(bytes, await anyio.to_thread.run_sync(fn, arg))


def serving(registry: CollectorRegistry, take: Any = lambda: None) -> Any:
    """GET /metrics serving `registry` as main.py wires it: `take` on the loop, the rest in a worker."""
    return metrics_handler(take, lambda _: generate_latest(registry), _in_worker)


def app_with(registry: CollectorRegistry) -> Litestar:
    return Litestar(
        [model, boom, serving(registry)],
        middleware=[http_metrics_config(registry).middleware],
        debug=False,
    )


def requests(registry: CollectorRegistry, path: str, status: str, method: str = "GET") -> float | None:
    return registry.get_sample_value(
        "earshot_http_requests_total",
        {"app_name": "earshot", "method": method, "path": path, "status_code": status},
    )


def series_of(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in registry.collect()
        for s in family.samples
        if s.name.startswith("earshot_http")
    }


def test_requests_are_counted_on_our_registry_by_route_template() -> None:
    registry = CollectorRegistry()
    global_before = REGISTRY.get_sample_value(
        "earshot_http_requests_total",
        {"app_name": "earshot", "method": "GET", "path": "/v1/models/{model_id}", "status_code": "200"},
    )
    with TestClient(app_with(registry), raise_server_exceptions=False) as client:
        assert client.get("/v1/models/known").status_code == 200
        assert client.get("/v1/models/org/unknown-1").status_code == 404
        assert client.get("/boom").status_code == 500
        scrape = client.get("/metrics")
    assert requests(registry, "/v1/models/{model_id}", "200") == 1
    assert requests(registry, "/v1/models/{model_id}", "404") == 1
    assert requests(registry, "/boom", "500") == 1
    assert (
        registry.get_sample_value(
            "earshot_http_requests_error_total",
            {"app_name": "earshot", "method": "GET", "path": "/boom", "status_code": "500"},
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "earshot_http_request_duration_seconds_count",
            {"app_name": "earshot", "method": "GET", "path": "/v1/models/{model_id}", "status_code": "200"},
        )
        == 1
    )
    # served in the same exposition as everything else on the registry
    assert (
        'earshot_http_requests_total{app_name="earshot",method="GET",path="/boom",status_code="500"} 1.0'
        in (scrape.text)
    )
    # and nowhere else: not on the global registry, not in Litestar's class-level cache
    assert (
        REGISTRY.get_sample_value(
            "earshot_http_requests_total",
            {"app_name": "earshot", "method": "GET", "path": "/v1/models/{model_id}", "status_code": "200"},
        )
        == global_before
    )
    assert not any(name.startswith("earshot_http") for name in PrometheusMiddleware._metrics)


def test_a_flood_of_unknown_paths_and_ids_adds_no_series() -> None:
    registry = CollectorRegistry()
    with TestClient(app_with(registry), raise_server_exceptions=False) as client:
        client.get("/v1/models/nope-0")
        client.get("/no/such/route/0")
        before = series_of(registry)
        for i in range(1, 1000):
            assert client.get(f"/v1/models/nope-{i}").status_code == 404
            assert client.get(f"/no/such/route/{i}").status_code == 404
            assert client.post(f"/v1/models/nope-{i}").status_code == 405
    assert series_of(registry) == before
    assert requests(registry, "/v1/models/{model_id}", "404") == 1000
    text = generate_latest(registry).decode()
    assert "nope" not in text
    assert "no/such" not in text


def test_two_apps_do_not_share_series() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    with TestClient(app_with(first)) as a, TestClient(app_with(second)) as b:
        a.get("/v1/models/known")
        a.get("/v1/models/known")
        b.get("/v1/models/known")
    assert requests(first, "/v1/models/{model_id}", "200") == 2
    assert requests(second, "/v1/models/{model_id}", "200") == 1


def test_a_scope_without_route_template_is_labelled_unmatched() -> None:
    config = http_metrics_config(CollectorRegistry())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    middleware = RegistryPrometheusMiddleware(app, config)
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/raw/123",
        "raw_path": b"/raw/123",
        "query_string": b"",
        "headers": [],
        "app": None,
        "state": {},
        "path_params": {},
        "server": ("x", 80),
        "scheme": "http",
    }
    labels = middleware._get_default_labels(Request(scope))  # type: ignore[arg-type]
    assert labels["path"] == UNMATCHED_PATH


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text; version=1.0.0"])
def test_metrics_endpoint_content_type(accept: str | None) -> None:
    registry = CollectorRegistry()
    headers = {"accept": accept} if accept else {}
    with TestClient(app_with(registry)) as client:
        response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    # the Prometheus text format (whatever version the library speaks), never OpenMetrics
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert response.headers["cache-control"] == "no-store"


def test_metrics_takes_only_the_snapshot_on_the_loop() -> None:
    """The cache's snapshot is taken on the event loop thread (the cache's table may only be read
    there); every collector and prometheus_client's formatting, most of a scrape's cost, run in a
    worker thread. The body is what generate_latest makes of the same registry."""
    import threading

    from prometheus_client.core import GaugeMetricFamily

    threads: dict[str, int] = {}

    class Probe:
        def collect(self) -> list[GaugeMetricFamily]:
            threads["collect"] = threading.get_ident()
            return [GaugeMetricFamily("earshot_probe", "a probe", value=7)]

    def take() -> None:
        threads["take"] = threading.get_ident()

    @get("/loop-thread", sync_to_thread=False)
    def loop_thread() -> int:
        return threading.get_ident()

    registry = CollectorRegistry()
    registry.register(Probe())
    app = Litestar([loop_thread, serving(registry, take)], debug=False)
    with TestClient(app) as client:
        loop_ident = client.get("/loop-thread").json()
        body = client.get("/metrics").text
    seen = dict(threads)
    assert "earshot_probe 7.0" in body
    assert body == generate_latest(registry).decode()
    assert seen["take"] == loop_ident
    assert seen["collect"] != loop_ident
