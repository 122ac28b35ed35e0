"""Cache and inference metrics that count things (DESIGN §5): counters and histograms fed by events.

`CacheMetrics` is a cache `Observer` (every event becomes a counter increment or a histogram
observation) and the `record_inference` callback of the API. What the cache *is* right now
(loaded models, idle ages, bytes) is not kept here: `earshot.observability.collector` reads it
from a snapshot at scrape time.

Labels: `model` values come only from the catalog. Until `bind(catalog)` is called, and for any
id the catalog does not hold, an event is dropped rather than labelled, so nothing a client sends
can create a series. `task` comes from the catalog too (`transcription` or `speech`).

`bind()` creates at zero, for every catalog model, the counter series the alerts count from:
failed and timed-out loads, reloads, and capacity evictions (memory evictions too when a memory
budget is set). Prometheus's `rate()`/`increase()` need a sample before the first increment, so a
series born at its first event would hide that event (the first failed load, the first reload of a
storm). The other series (hit/miss/coalesced, successful loads, idle and manual evictions,
histograms) are born with their first event: each pre-created series is a line of every scrape, for
every catalog model. Series live as long as the process, so an evicted model keeps its counters.

The metric objects come from a `MetricFactory`: prometheus_client's Counter and Histogram on a
registry by default; the fleet (`earshot.fleet.metrics`) passes one that makes Ray's metrics instead,
so that names, help texts, labels, buckets and the event-to-metric rules are written once, here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from earshot.cache.events import (
    CacheEvent,
    Coalesced,
    Evicted,
    EvictionReason,
    Hit,
    Loaded,
    LoadFailed,
    LoadFailureKind,
    LoadStarted,
    Miss,
)
from earshot.cache.protocol import ModelSpec
from earshot.models.catalog import Catalog

log = logging.getLogger("earshot.observability")

# Bucket bounds: few enough to keep a scrape cheap (each bucket is one line per model), with edges
# at the thresholds alerts use (60 s for slow loads).
LOAD_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
INFERENCE_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Idle age at eviction and residency: seconds up to a day. Small idle ages under reason=capacity
# mean a model was pushed out almost as soon as it was released: the cache is thrashing.
LIFETIME_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0)


class CounterChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class HistogramChild(Protocol):
    def observe(self, amount: float) -> None: ...


class CounterFamily(Protocol):
    """A counter with labels. `labels(...)` creates the series (at 0) if it does not exist yet."""

    def labels(self, *values: str) -> CounterChild: ...


class HistogramFamily(Protocol):
    def labels(self, *values: str) -> HistogramChild: ...


class MetricFactory(Protocol):
    """Makes the labelled counters and histograms `CacheMetrics` records into."""

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> CounterFamily: ...

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily: ...


class PrometheusFactory:
    """prometheus_client metrics on `registry` (the single-process server)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> CounterFamily:
        return Counter(name, documentation, list(labels), registry=self.registry)

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily:
        return Histogram(name, documentation, list(labels), buckets=tuple(buckets), registry=self.registry)


class CacheMetrics:
    """Counters and histograms of cache events and inferences, registered on `registry` (or made by
    `factory`)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        memory_budget: bool = False,
        factory: MetricFactory | None = None,
    ) -> None:
        if factory is None:
            if registry is None:
                raise TypeError("CacheMetrics needs a registry or a factory")
            factory = PrometheusFactory(registry)
        self.memory_budget = memory_budget  # a memory budget is set: memory evictions can happen
        self._tasks: Mapping[str, str] | None = None  # catalog id -> task; None until bound
        self.cache_requests = factory.counter(
            "earshot_cache_requests_total",
            "Model cache requests by result: hit (loaded), miss (started a load), coalesced "
            "(waited for a load already under way).",
            ["model", "result"],
        )
        self.loads = factory.counter(
            "earshot_model_loads_total",
            "Finished model loads by outcome (success, failure, timeout).",
            ["model", "task", "outcome"],
        )
        self.load_duration = factory.histogram(
            "earshot_model_load_duration_seconds",
            "Time to load a model, successful loads only.",
            ["model", "task"],
            LOAD_DURATION_BUCKETS,
        )
        self.evictions = factory.counter(
            "earshot_model_evictions_total",
            "Model unloads by reason (idle, capacity, memory, manual, shutdown).",
            ["model", "reason"],
        )
        self.reloads = factory.counter(
            "earshot_model_reloads_total",
            "Loads started for a model evicted less than thrash_window_seconds before.",
            ["model"],
        )
        self.idle_at_eviction = factory.histogram(
            "earshot_model_idle_at_eviction_seconds",
            "How long an evicted model had been idle (small values under reason=capacity: thrashing).",
            ["reason"],
            LIFETIME_BUCKETS,
        )
        self.residency = factory.histogram(
            "earshot_model_residency_seconds",
            "How long an evicted model had been loaded (loaded-to-evicted time).",
            ["reason"],
            LIFETIME_BUCKETS,
        )
        self.inference_duration = factory.histogram(
            "earshot_inference_duration_seconds",
            "Time spent running a model on one request (transcription or synthesis).",
            ["model", "task"],
            INFERENCE_DURATION_BUCKETS,
        )
        self.audio_seconds = factory.counter(
            "earshot_audio_duration_seconds_total",
            "Seconds of audio processed: audio in for transcription, audio out for speech.",
            ["model", "task"],
        )
        self._handlers: dict[type[CacheEvent], Callable[[CacheEvent, str], None]] = {
            Hit: self._hit,
            Miss: self._miss,
            Coalesced: self._coalesced,
            LoadStarted: self._load_started,
            Loaded: self._loaded,
            LoadFailed: self._load_failed,
            Evicted: self._evicted,
        }

    def bind(self, catalog: Catalog) -> None:
        """Accept events and inferences of `catalog`'s models (by canonical id) from now on, and of
        each model the catalog adds later (a hub id resolved on demand) once it is added."""
        self._tasks = {}
        for spec in catalog.specs.values():
            self._add_model(spec)
        catalog.on_add(self._add_model)

    def _add_model(self, spec: ModelSpec) -> None:
        self.add_model(spec.id, spec.task.value)

    def add_model(self, model: str, task: str) -> None:
        """Accept events and inferences of `model` from now on, and create its alert series at 0."""
        tasks = self._tasks if self._tasks is not None else {}
        self._tasks = {**tasks, model: task}
        reasons = [EvictionReason.CAPACITY]
        if self.memory_budget:
            reasons.append(EvictionReason.MEMORY)  # only a budget evicts for memory
        for kind in LoadFailureKind:
            self.loads.labels(model, task, kind.value)
        for reason in reasons:
            self.evictions.labels(model, reason.value)
        self.reloads.labels(model)

    def task_of(self, model: str) -> str | None:
        """The catalog task of `model`, or None when it must not become a label."""
        tasks = self._tasks
        return None if tasks is None else tasks.get(model)

    # ------------------------------------------------------------------ observer

    def __call__(self, event: CacheEvent) -> None:
        task = self.task_of(event.model)
        if task is None:
            log.debug("metrics: dropped %s for a model outside the catalog", event.kind)
            return
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event, task)

    def _hit(self, event: CacheEvent, task: str) -> None:
        self.cache_requests.labels(event.model, "hit").inc()

    def _miss(self, event: CacheEvent, task: str) -> None:
        self.cache_requests.labels(event.model, "miss").inc()

    def _coalesced(self, event: CacheEvent, task: str) -> None:
        self.cache_requests.labels(event.model, "coalesced").inc()

    def _load_started(self, event: CacheEvent, task: str) -> None:
        # A reload counts when it starts: each one makes requests pay load latency, whether or not
        # the load then succeeds.
        if isinstance(event, LoadStarted) and event.reload:
            self.reloads.labels(event.model).inc()

    def _loaded(self, event: CacheEvent, task: str) -> None:
        assert isinstance(event, Loaded)
        self.loads.labels(event.model, task, "success").inc()
        self.load_duration.labels(event.model, task).observe(max(0.0, event.duration_s))

    def _load_failed(self, event: CacheEvent, task: str) -> None:
        assert isinstance(event, LoadFailed)
        self.loads.labels(event.model, task, event.error_kind.value).inc()

    def _evicted(self, event: CacheEvent, task: str) -> None:
        assert isinstance(event, Evicted)
        reason = event.reason.value
        self.evictions.labels(event.model, reason).inc()
        self.idle_at_eviction.labels(reason).observe(max(0.0, event.idle_s))
        self.residency.labels(reason).observe(max(0.0, event.resident_s))

    # ------------------------------------------------------------------ inference

    def record_inference(self, *, model: str, task: str, duration_s: float, audio_s: float) -> None:
        """One finished inference (the API's `record_inference`). `task` is taken from the catalog."""
        catalog_task = self.task_of(model)
        if catalog_task is None:
            log.debug("metrics: dropped an inference of a model outside the catalog")
            return
        self.inference_duration.labels(model, catalog_task).observe(max(0.0, duration_s))
        if audio_s > 0:
            self.audio_seconds.labels(model, catalog_task).inc(audio_s)
