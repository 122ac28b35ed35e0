"""Traces: OpenTelemetry through Litestar's plugin, plus the cache's own spans.

Spans of one request: the server span (the plugin; renamed `<METHOD> <route template>` once the
route is known), `cache.acquire` (`traced_acquire`: the wait for the model, with attribute
`earshot.cache.outcome` = hit/miss/coalesced), under it `model.load` when this request started or
joined a load (`LoadSpanObserver`, from LoadStarted to Loaded/LoadFailed), then `decode_audio` and
`inference` (opened by the API).

The provider has resource `service.name=earshot`. Spans are exported over OTLP/HTTP when
`otlp_endpoint` is set (a bare `http://host:4318` gets `/v1/traces` appended), and not at all
otherwise; trace and span ids still exist, so log lines of one request share a `trace_id`. Tests
inject their own exporter or span processor (`InMemorySpanExporter`) and keep the provider out of
the global slot: OpenTelemetry lets the global TracerProvider be set only once per process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit

from litestar.enums import ScopeType
from litestar.middleware.base import ASGIMiddleware
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.types import ASGIApp, Receive, Scope, Send
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from earshot import __version__
from earshot.cache.events import CacheEvent, Loaded, LoadFailed, LoadStarted
from earshot.cache.lease import Lease

log = logging.getLogger("earshot.observability")

SERVICE_NAME = "earshot"
TRACER_NAME = "earshot.cache"
ATTR_MODEL = "earshot.model"
ATTR_TASK = "earshot.task"
ATTR_OUTCOME = "earshot.cache.outcome"
ATTR_RELOAD = "earshot.reload"
ATTR_LOAD_OUTCOME = "earshot.load.outcome"
ATTR_FOOTPRINT = "earshot.footprint_bytes"
# Scrapes and health checks would make one trace each, every few seconds.
UNTRACED_PATHS = ["^/metrics$", "^/health"]


class Acquirable(Protocol):
    def acquire(self, model_id: str, keep_alive: float | None = None) -> Any: ...


# ---------------------------------------------------------------------- provider and plugin


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: `endpoint` as given, or with `/v1/traces` when it has no path."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def build_tracer_provider(
    otlp_endpoint: str | None,
    *,
    exporter: SpanExporter | None = None,
    span_processor: SpanProcessor | None = None,
) -> TracerProvider:
    """A provider for service `earshot`: exporting to `exporter` (synchronously, for tests), to
    `span_processor`, or over OTLP/HTTP in batches when `otlp_endpoint` is set; else nowhere."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE_NAME, "service.version": __version__})
    )
    if span_processor is not None:
        provider.add_span_processor(span_processor)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_endpoint and exporter is None and span_processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_traces_url(otlp_endpoint)))
        )
    return provider


def install_global(provider: TracerProvider) -> bool:
    """Make `provider` the global one (for `trace.get_tracer` users such as the API) if no other
    was set in this process; OpenTelemetry refuses a second one. True if installed."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        log.debug("a global TracerProvider is already set; keeping it")
        return False
    trace.set_tracer_provider(provider)
    return True


def _span_details(scope: Scope) -> tuple[str, dict[str, Any]]:
    """Name the server span by method only until the route is known (no raw paths in span names)."""
    method = str(scope.get("method", "")).strip()
    return (method or str(scope.get("type", "asgi"))), {}


def tracing_plugin(provider: TracerProvider) -> OpenTelemetryPlugin:
    return OpenTelemetryPlugin(
        OpenTelemetryConfig(
            tracer_provider=provider,
            scope_span_details_extractor=_span_details,
            exclude=UNTRACED_PATHS,
        )
    )


class RouteSpanMiddleware(ASGIMiddleware):
    """Once routed: name the server span `<METHOD> <route template>` and set `http.route`."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        span = trace.get_current_span()
        template = scope.get("path_template")
        if template and span.is_recording():
            span.update_name(f"{scope.get('method', 'HTTP')} {template}")
            span.set_attribute("http.route", template)
        await next_app(scope, receive, send)


# ---------------------------------------------------------------------- cache spans


def _default_tracer() -> Tracer:
    return trace.get_tracer(TRACER_NAME, __version__)


@asynccontextmanager
async def traced_acquire(
    cache: Acquirable, model_id: str, keep_alive: float | None = None, *, tracer: Tracer | None = None
) -> AsyncIterator[Lease]:
    """`cache.acquire(model_id, keep_alive)` inside a span "cache.acquire".

    The span covers the wait for the model only (ending as soon as the lease is granted, with
    `earshot.cache.outcome`); the block then runs under the request's span, so `inference` is a
    sibling of `cache.acquire`, not a child. A failure to acquire is recorded on the span.
    """
    tracer = tracer or _default_tracer()
    async with AsyncExitStack() as stack:
        with tracer.start_as_current_span("cache.acquire", attributes={ATTR_MODEL: model_id}) as span:
            lease: Lease = await stack.enter_async_context(cache.acquire(model_id, keep_alive))
            span.set_attribute(ATTR_MODEL, lease.spec.id)
            span.set_attribute(ATTR_TASK, lease.spec.task.value)
            span.set_attribute(ATTR_OUTCOME, lease.outcome)
        yield lease


def _ns(wall_seconds: float) -> int:
    return int(wall_seconds * 1e9)


class LoadSpanObserver:
    """A cache Observer that turns LoadStarted .. Loaded/LoadFailed into a span "model.load".

    LoadStarted runs in the load task, which inherits the context of the request that started the
    load, so the span's parent is that request's `cache.acquire` span. Times are the events' own.
    """

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._open: dict[str, Span] = {}

    def __call__(self, event: CacheEvent) -> None:
        if isinstance(event, LoadStarted):
            stale = self._open.pop(event.model, None)
            if stale is not None:  # a load that never reported its end
                stale.set_status(Status(StatusCode.ERROR, "superseded by a new load"))
                stale.end(end_time=_ns(event.at))
            self._open[event.model] = self._tracer.start_span(
                "model.load",
                start_time=_ns(event.at),
                attributes={ATTR_MODEL: event.model, ATTR_TASK: event.task, ATTR_RELOAD: event.reload},
            )
        elif isinstance(event, Loaded):
            span = self._take(event.model, event.task, event.at - event.duration_s, event.reload)
            span.set_attribute(ATTR_LOAD_OUTCOME, "success")
            span.set_attribute(ATTR_FOOTPRINT, event.footprint_bytes)
            span.set_attribute("earshot.footprint_measured", event.measured)
            for device, nbytes in event.footprint.items():
                span.set_attribute(f"earshot.footprint_bytes.{device}", nbytes)
            span.end(end_time=_ns(event.at))
        elif isinstance(event, LoadFailed):
            span = self._take(event.model, event.task, event.at - event.duration_s, None)
            span.set_attribute(ATTR_LOAD_OUTCOME, event.error_kind.value)
            span.set_attribute("earshot.out_of_memory", event.out_of_memory)
            span.set_status(Status(StatusCode.ERROR, event.message))
            span.end(end_time=_ns(event.at))

    def _take(self, model: str, task: str, started_at: float, reload: bool | None) -> Span:
        span = self._open.pop(model, None)
        if span is None:  # the start was missed (observer added mid-load): build it from the duration
            attributes: dict[str, Any] = {ATTR_MODEL: model, ATTR_TASK: task}
            span = self._tracer.start_span("model.load", start_time=_ns(started_at), attributes=attributes)
        if reload is not None:
            span.set_attribute(ATTR_RELOAD, reload)
        return span
