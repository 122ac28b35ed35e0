"""Metrics, logs, traces and live events: observers of the cache and of inference.

`Observability.create(settings)` builds every part; the app factory (main.py) then hands
`observers` and `memory_probe` to the ModelCache, calls `bind(cache, catalog)`, passes `tracer` and
`record_inference` to the inference service, mounts `plugins` and `middleware`, and serves
`registry` and `events` with the API's /metrics and /api/events routes; `start()` / `stop()` run in
the app lifespan. The parts, one module each:

- metrics.py     counters and histograms from cache events and inferences (`CacheMetrics`)
- collector.py   gauges read from `cache.snapshot()` at scrape time (`CacheStateCollector`)
- http_metrics.py Litestar's Prometheus middleware, on our registry
- nvml.py        GPU sampler thread and its collector; the GPU half of the memory probe
- logging.py     structlog (JSON lines), request ids, one log line per cache event
- tracing.py     OpenTelemetry provider and plugin, `cache.acquire` and `model.load` spans
- events.py      ring buffer of recent cache events and live subscriptions (/api/events)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import getLogger  # not `import logging`: the submodule .logging takes that name here
from typing import IO, TYPE_CHECKING, Any

from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from earshot.cache.events import Observer
from earshot.cache.protocol import rss_probe
from earshot.observability.collector import CacheStateCollector, SnapshotSource
from earshot.observability.events import EventLog
from earshot.observability.http_metrics import http_metrics_config
from earshot.observability.logging import CacheEventLogger, RequestContextMiddleware, logging_plugin
from earshot.observability.metrics import CacheMetrics
from earshot.observability.nvml import DisabledSampler, GpuCollector, NvmlSampler
from earshot.observability.tracing import (
    TRACER_NAME,
    LoadSpanObserver,
    RouteSpanMiddleware,
    build_tracer_provider,
    install_global,
    traced_acquire,
    tracing_plugin,
)

log = getLogger("earshot.observability")

if TYPE_CHECKING:
    from earshot.models.catalog import Catalog
    from earshot.settings import Settings

__all__ = ["Observability", "default_registry", "traced_acquire"]

_UNSET: Any = object()


def default_registry() -> CollectorRegistry:
    """A fresh registry with prometheus_client's process, platform and GC collectors on it."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclass
class Observability:
    """Every observability part of one app, wired together. Build it with `create`."""

    settings: Settings
    registry: CollectorRegistry
    metrics: CacheMetrics
    events: EventLog
    gpu: NvmlSampler
    tracer_provider: TracerProvider
    tracer: Tracer
    load_spans: LoadSpanObserver
    log_events: CacheEventLogger
    observers: list[Observer] = field(default_factory=list)
    plugins: list[Any] = field(default_factory=list)
    middleware: list[Any] = field(default_factory=list)
    cache: SnapshotSource | None = None
    catalog: Catalog | None = None
    _started: bool = False

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        nvml: Any = _UNSET,
        span_exporter: SpanExporter | None = None,
        span_processor: SpanProcessor | None = None,
        set_global_tracer_provider: bool = True,
        log_stream: IO[str] | None = None,
    ) -> Observability:
        """Build metrics, logging, tracing, GPU sampling and the event log for `settings`.

        registry: where every metric goes (default: a fresh one with the process, platform and GC
            collectors). One Observability per registry.
        nvml: the NVML module (default: `pynvml`, imported at `start()`); tests pass a fake one,
            None disables GPU sampling.
        span_exporter / span_processor: where spans go instead of OTLP (tests: InMemorySpanExporter).
        set_global_tracer_provider: also install the provider globally (for `trace.get_tracer`
            users) when no other was installed in this process.
        log_stream: where log lines go (default: standard output).
        """
        # In the text format every counter's and histogram's `_created` sample becomes a series of
        # its own (earshot_cache_requests_created, ...): more series and slower scrapes for a value
        # no dashboard or alert reads. prometheus_client only offers a process-wide switch.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = registry if registry is not None else default_registry()
        metrics = CacheMetrics(registry, memory_budget=settings.memory_budget_bytes is not None)
        interval = settings.nvml_interval_seconds
        sampler = (
            DisabledSampler(interval)
            if nvml is None
            else NvmlSampler(interval, nvml=None if nvml is _UNSET else nvml)
        )
        registry.register(GpuCollector(sampler))
        events = EventLog(settings.events_buffer_size)
        provider = build_tracer_provider(
            settings.otlp_endpoint, exporter=span_exporter, span_processor=span_processor
        )
        if set_global_tracer_provider:
            install_global(provider)
        tracer = provider.get_tracer(TRACER_NAME)
        load_spans = LoadSpanObserver(tracer)
        log_events = CacheEventLogger()
        http = http_metrics_config(registry)
        return cls(
            settings=settings,
            registry=registry,
            metrics=metrics,
            events=events,
            gpu=sampler,
            tracer_provider=provider,
            tracer=tracer,
            load_spans=load_spans,
            log_events=log_events,
            # Independent of each other; each is quick and never calls back into the cache.
            observers=[metrics, log_events, load_spans, events],
            plugins=[logging_plugin(settings, stream=log_stream), tracing_plugin(provider)],
            # Outermost first: HTTP metrics time the whole routed request.
            middleware=[http.middleware, RequestContextMiddleware(), RouteSpanMiddleware()],
        )

    # ------------------------------------------------------------------ wiring

    def bind(self, cache: SnapshotSource, catalog: Catalog) -> None:
        """Attach the cache and catalog: metrics accept the catalog's ids, and the state collector
        (reading `cache.snapshot()` at each scrape) joins the registry. Once per Observability."""
        if self.cache is not None:
            raise RuntimeError("Observability.bind() was called twice")
        self.cache = cache
        self.catalog = catalog
        self.metrics.bind(catalog)
        self.registry.register(CacheStateCollector(cache, catalog))

    def memory_probe(self) -> Mapping[str, int]:
        """The cache's MemoryProbe: {"cpu": RSS, "cuda:<index>": this process's GPU memory, ...}."""
        reading = dict(rss_probe())
        reading.update(self.gpu.process_memory())
        return reading

    def record_inference(self, *, model: str, task: str, duration_s: float, audio_s: float) -> None:
        self.metrics.record_inference(model=model, task=task, duration_s=duration_s, audio_s=audio_s)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the NVML sampler (one INFO line if NVML is absent); accept event streams."""
        self.events.reopen()
        self.gpu.start()
        self._started = True

    def stop(self) -> None:
        """End the live event streams, stop the sampler (joins its thread), flush buffered spans."""
        self.events.close()
        self.gpu.stop()
        if self._started:
            self._started = False
            try:
                self.tracer_provider.force_flush(timeout_millis=5000)
            except Exception:  # an exporter that fails at exit must not fail the shutdown
                log.warning("flushing spans at shutdown failed", exc_info=True)
