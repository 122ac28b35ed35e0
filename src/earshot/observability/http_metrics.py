"""HTTP request metrics: Litestar's Prometheus middleware, on *our* registry.

Litestar's `PrometheusMiddleware` creates its four metrics (`<prefix>_requests_total`,
`_request_duration_seconds`, `_requests_in_progress`, `_requests_error_total`) on
prometheus_client's global REGISTRY and caches them in the class attribute
`PrometheusMiddleware._metrics`, shared by every app in the process. earshot serves one
exposition from the registry it was given, so the metrics must live there instead.

How: `PrometheusConfig` takes a `middleware_class`. `RegistryPrometheusConfig` carries the
registry, and `RegistryPrometheusMiddleware` overrides the four public factory methods to create
(once per config, i.e. once per app) the same metrics on that registry. Everything else (labels,
timing, status handling, exclusions) is Litestar's code, unchanged. Compared with re-exporting the
global metrics through a proxy collector, this keeps the global REGISTRY and the class-level cache
untouched (two apps in one process, as in tests, do not share or double-count series). One private
method is overridden too: `_get_default_labels`, to label by route template (below); the test suite
checks the metrics land on our registry and nowhere else, and with the labels expected, so a
Litestar release that renames it fails there.

Paths: with `group_path=True` the `path` label is the route template (`/v1/models/{model_id:path}`),
never the raw path. Requests that match no route (404, 405 from the router) never reach route
middleware at all, so a flood of unknown paths creates no series; should a scope arrive without a
template anyway (a mounted ASGI app), the label is "<unmatched>" instead of the raw path, and never
a KeyError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from litestar.connection import Request
from litestar.enums import ScopeType
from litestar.plugins.prometheus import PrometheusConfig, PrometheusMiddleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

HTTP_PREFIX = "earshot_http"
# Request durations of a speech server: milliseconds (health, metrics) to minutes (long audio).
HTTP_DURATION_BUCKETS: list[str | float] = [
    0.005,
    0.025,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
]
APP_NAME = "earshot"
UNMATCHED_PATH = "<unmatched>"


class RegistryPrometheusMiddleware(PrometheusMiddleware):
    """Litestar's Prometheus middleware, with its metrics on the registry of its config."""

    _config: RegistryPrometheusConfig

    def _metric(self, kind: type[MetricWrapperBase], suffix: str, doc: str, labels: dict[str, Any]) -> Any:
        config = self._config
        name = f"{config.prefix}{suffix}"
        metric = config.metrics.get(name)
        if metric is None:
            kwargs: dict[str, Any] = {}
            if kind is Histogram and config.buckets is not None:
                kwargs["buckets"] = config.buckets
            metric = kind(name, doc, labelnames=[*labels], registry=config.registry, **kwargs)
            config.metrics[name] = metric
        return metric

    def request_count(self, labels: dict[str, str | int | float]) -> Counter:
        return cast(Counter, self._metric(Counter, "_requests_total", "Total requests", labels))

    def request_time(self, labels: dict[str, str | int | float]) -> Histogram:
        return cast(
            Histogram,
            self._metric(Histogram, "_request_duration_seconds", "Request duration, in seconds", labels),
        )

    def requests_in_progress(self, labels: dict[str, str | int | float]) -> Gauge:
        return cast(
            Gauge,
            self._metric(Gauge, "_requests_in_progress", "Total requests currently in progress", labels),
        )

    def requests_error_count(self, labels: dict[str, str | int | float]) -> Counter:
        return cast(
            Counter, self._metric(Counter, "_requests_error_total", "Total errors in requests", labels)
        )

    def _get_default_labels(self, request: Request[Any, Any, Any]) -> dict[str, str | int | float]:
        scope = request.scope
        # The route template, never the raw path (`or`: a scope without a template).
        path = (scope.get("path_template") or UNMATCHED_PATH) if self._config.group_path else request.url.path
        return {
            "method": request.method if scope["type"] == ScopeType.HTTP else scope["type"],
            "path": path,
            "status_code": 200,
            "app_name": self._config.app_name,
        }


@dataclass
class RegistryPrometheusConfig(PrometheusConfig):
    """`PrometheusConfig` whose middleware puts its metrics on `registry` (one config per app)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    metrics: dict[str, MetricWrapperBase] = field(default_factory=dict)
    middleware_class: type[PrometheusMiddleware] = field(default=RegistryPrometheusMiddleware)


def http_metrics_config(registry: CollectorRegistry) -> RegistryPrometheusConfig:
    """earshot's HTTP metrics: prefix earshot_http, app_name earshot, route templates as paths."""
    return RegistryPrometheusConfig(
        app_name=APP_NAME,
        prefix=HTTP_PREFIX,
        group_path=True,
        buckets=list(HTTP_DURATION_BUCKETS),
        registry=registry,
    )
