"""Every cache metric of DESIGN §5 from a fleet worker, through Ray's own metrics machinery.

A fleet worker has no /metrics route: its metrics are Ray metrics (`ray.serve.metrics`: inside a
Serve replica they carry the `deployment`, `replica` and `application` tags), which the worker
process exports to its node's Ray metrics agent; Prometheus scrapes the agents (one per node, found
through Ray's service-discovery file; see deploy/prometheus-fleet.yml).

The names, help texts, labels, buckets and the rules turning cache events into counter increments
are those of the single-process server: `CacheMetrics` (observability/metrics.py) records into Ray
counters and histograms through a `MetricFactory`, and the state gauges are set from the same
`state_samples(snapshot)` the Prometheus collector (observability/collector.py) exports. Every series
also carries `worker` (the string given: the Serve replica id) and `node`.

What Ray does to the names (Ray 2.60, OpenTelemetry exporter, found by running it):
- every name gets the prefix `ray_` (the agent's namespace): `earshot_model_loaded` is exported as
  `ray_earshot_model_loaded`;
- a counter is exported with one `_total`: `earshot_model_loads_total` stays
  `ray_earshot_model_loads_total` (not `_total_total`); histograms keep `_bucket`/`_sum`/`_count`;
- tags added by Ray: `Component`, `NodeAddress`, `SessionName`, `Version`, `WorkerId`,
  `otel_scope_name`, `otel_scope_version`, `otel_scope_schema_url`;
- the worker process pushes its values to the agent every `max(metrics_report_interval_ms, 1000)` ms
  (`_system_config={"metrics_report_interval_ms": ...}`; default 10000): a state gauge is as current
  as that interval plus the scrape interval;
- a gauge cannot be removed: one the worker stops setting is dropped by the agent after two export
  intervals only when the whole process stops reporting. So a model that leaves the snapshot has its
  per-model gauges set to 0 (never left showing loaded); counters of a worker that died stay in its
  agent (summing over workers stays right);
- Ray drops a gauge value that is not finite (+Inf, NaN) without a word: an unlimited limit
  (`earshot_cache_memory_budget_bytes`, `earshot_cache_capacity_models`, an idle timeout of -1),
  `+Inf` on the single server, is exported as `UNLIMITED` (the largest float, 1.8e308), which
  compares, sorts and aggregates (max, > 0) like +Inf in PromQL;
- a counter series cannot be created at 0 through the public `inc()` (it refuses 0): the series the
  alerts count from are created by recording 0 through `Metric._record`, as prometheus_client's
  `labels()` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ray.serve import metrics as serve_metrics

from earshot.cache.events import CacheEvent, Observer
from earshot.cache.state import CacheSnapshot
from earshot.models.catalog import Catalog
from earshot.observability.collector import STATE_GAUGES, state_samples
from earshot.observability.metrics import (
    CacheMetrics,
    CounterChild,
    CounterFamily,
    HistogramChild,
    HistogramFamily,
)

# Read when Ray starts (ray.init / serve.start), not at import: set before either can run.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

log = logging.getLogger("earshot.fleet")

# What an unlimited (+Inf) limit is exported as: Ray drops non-finite gauge values.
UNLIMITED = sys.float_info.max

# The labels every fleet series carries on top of its §5 labels.
FLEET_LABELS = ("worker", "node")


def _tag_keys(labels: Sequence[str]) -> Any:
    """Ray's tag keys: the fleet labels, then the §5 labels (typed Any: Ray annotates the tuple as
    `Tuple[str]`, one element, though it takes any length)."""
    return (*FLEET_LABELS, *labels)


class _RayCounterChild:
    def __init__(self, counter: Any, tags: dict[str, str]) -> None:
        self._counter = counter
        self._tags = tags

    def inc(self, amount: float = 1) -> None:
        if amount > 0:  # Ray refuses 0 (and a counter never goes down)
            self._counter.inc(float(amount), tags=dict(self._tags))


class _RayCounter:
    """A Ray counter with prometheus_client's `labels(...)`: the first call for a label set creates
    the series at 0, so alerts see a sample before the first increment."""

    def __init__(self, counter: Any, labels: Sequence[str], fleet_tags: dict[str, str]) -> None:
        self._counter = counter
        self._labels = tuple(labels)
        self._fleet_tags = fleet_tags
        self._children: dict[tuple[str, ...], _RayCounterChild] = {}

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            tags = {**self._fleet_tags, **dict(zip(self._labels, values, strict=True))}
            # The public inc() refuses 0; _record adds 0 to the (new) cumulative series.
            self._counter._record(0.0, tags=dict(tags))
            child = self._children[values] = _RayCounterChild(self._counter, tags)
        return child


class _RayHistogramChild:
    def __init__(self, histogram: Any, tags: dict[str, str]) -> None:
        self._histogram = histogram
        self._tags = tags

    def observe(self, amount: float) -> None:
        self._histogram.observe(float(amount), tags=dict(self._tags))


class _RayHistogram:
    def __init__(self, histogram: Any, labels: Sequence[str], fleet_tags: dict[str, str]) -> None:
        self._histogram = histogram
        self._labels = tuple(labels)
        self._fleet_tags = fleet_tags

    def labels(self, *values: str) -> HistogramChild:
        tags = {**self._fleet_tags, **dict(zip(self._labels, values, strict=True))}
        return _RayHistogramChild(self._histogram, tags)


class RayFactory:
    """`MetricFactory` making `ray.serve.metrics` counters and histograms tagged worker and node."""

    def __init__(self, worker: str, node: str) -> None:
        self.tags = {"worker": worker, "node": node}

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> CounterFamily:
        counter = serve_metrics.Counter(name, description=documentation, tag_keys=_tag_keys(labels))
        return _RayCounter(counter, labels, self.tags)

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily:
        histogram = serve_metrics.Histogram(
            name, description=documentation, boundaries=list(buckets), tag_keys=_tag_keys(labels)
        )
        return _RayHistogram(histogram, labels, self.tags)


class FleetMetrics:
    """The §5 metrics of one fleet worker, as Ray metrics.

    `observer` goes to the worker's ModelCache (`observers=[...]`), `record_inference` to its
    LocalInference (`record=`), `start(cache.snapshot)` (from the worker's event loop) keeps the state
    gauges current, `stop()` ends that and zeroes the per-model gauges.

    catalog: when given (or `bind(catalog)` later), only its models become labels and every catalog
        model has an `earshot_model_loaded` series, as in the single server. Without one, a model
        becomes a label when the worker's cache first reports it (a worker's cache only ever holds
        catalog models, so the set stays the catalog's size at most).
    """

    def __init__(
        self,
        worker: str,
        node: str,
        *,
        catalog: Catalog | None = None,
        memory_budget: bool = False,
    ) -> None:
        self.worker = worker
        self.node = node
        self._tags = {"worker": worker, "node": node}
        self.metrics = CacheMetrics(memory_budget=memory_budget, factory=RayFactory(worker, node))
        self._gauges = {
            g.name: serve_metrics.Gauge(g.name, description=g.documentation, tag_keys=_tag_keys(g.labels))
            for g in STATE_GAUGES
        }
        self._catalog: Catalog | None = None
        self._pairs: tuple[tuple[str, str], ...] = ()
        self._ids: frozenset[str] | None = None
        self._set: dict[str, set[tuple[str, ...]]] = {g.name: set() for g in STATE_GAUGES}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        if catalog is not None:
            self.bind(catalog)

    # ------------------------------------------------------------------ events

    def bind(self, catalog: Catalog) -> None:
        """Label only `catalog`'s models (and those it adds later); give each a loaded series."""
        self._catalog = catalog
        self.metrics.bind(catalog)
        self._refresh()
        catalog.on_add(self._refresh)

    def _refresh(self, _: object = None) -> None:
        catalog = self._catalog
        if catalog is None:
            return
        specs = catalog.specs
        self._pairs = tuple((i, specs[i].task.value) for i in catalog.ids())
        self._ids = frozenset(specs)

    @property
    def observer(self) -> Observer:
        return self._observe

    def _observe(self, event: CacheEvent) -> None:
        if self._catalog is None and self.metrics.task_of(event.model) is None:
            self._learn(event.model, event.task)
        self.metrics(event)

    def _learn(self, model: str, task: str) -> None:
        self.metrics.add_model(model, task)
        self._pairs = (*self._pairs, (model, task))

    def record_inference(self, *, model: str, task: str, duration_s: float, audio_s: float) -> None:
        """One finished inference (LocalInference's `record=`), as `Observability.record_inference`."""
        if self._catalog is None and self.metrics.task_of(model) is None:
            self._learn(model, task)
        self.metrics.record_inference(model=model, task=task, duration_s=duration_s, audio_s=audio_s)

    # ------------------------------------------------------------------ state gauges

    def update(self, snapshot: CacheSnapshot) -> None:
        """Set every state gauge from `snapshot`; a series set before and absent now reads 0."""
        samples = state_samples(snapshot, self._pairs, self._ids)
        for name, gauge in self._gauges.items():
            labels_of = next(g.labels for g in STATE_GAUGES if g.name == name)
            now: set[tuple[str, ...]] = set()
            for values, value in samples[name]:
                if math.isnan(value):
                    continue
                now.add(values)
                if math.isinf(value):
                    value = math.copysign(UNLIMITED, value)
                gauge.set(value, tags={**self._tags, **dict(zip(labels_of, values, strict=True))})
            for gone in self._set[name] - now:
                gauge.set(0.0, tags={**self._tags, **dict(zip(labels_of, gone, strict=True))})
            self._set[name] |= now

    def start(self, snapshot: Callable[[], CacheSnapshot], interval_s: float = 1.0) -> None:
        """Set the state gauges from `snapshot()` now and every `interval_s` seconds, in a task of
        the running event loop (call it from the worker's loop: the cache's table is read there)."""
        if self._task is not None:
            raise RuntimeError("FleetMetrics.start() was called twice")
        loop = asyncio.get_running_loop()  # RuntimeError outside a running loop, on purpose
        self._stopped = False
        self.update(snapshot())
        self._task = loop.create_task(self._run(snapshot, interval_s), name="earshot-fleet-metrics")

    async def _run(self, snapshot: Callable[[], CacheSnapshot], interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self._stopped:
                return
            try:
                self.update(snapshot())
            except Exception:  # a failed update must not end the loop: the next one may work
                log.warning("fleet metrics: updating the state gauges failed", exc_info=True)

    def stop(self) -> None:
        """Stop updating; every per-model gauge set so far reads 0 (the worker holds nothing now).
        Callable from the loop, from another thread, or once the loop is closed."""
        self._stopped = True  # an update already due does not run after this
        task, self._task = self._task, None
        if task is not None and not task.done():
            loop = task.get_loop()
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                task.cancel()
            else:
                with contextlib.suppress(RuntimeError):  # that loop is closed: the task is gone with it
                    loop.call_soon_threadsafe(task.cancel)
        for name, gauge in self._gauges.items():
            labels_of = next(g.labels for g in STATE_GAUGES if g.name == name)
            if "model" not in labels_of:
                continue
            for values in self._set[name]:
                gauge.set(0.0, tags={**self._tags, **dict(zip(labels_of, values, strict=True))})
