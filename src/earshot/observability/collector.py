"""The cache's current state as Prometheus gauges, read from `cache.snapshot()` at scrape time.

Nothing here keeps a copy of the cache's state: every scrape takes one snapshot (a pure read on
the event loop, no awaits: the only thread allowed to read the cache's table) and turns it into
gauges. `render(registry, snapshot)` runs the whole scrape (this collector on that snapshot, every
other collector, the text formatting) in a worker thread, so a scrape holds the event loop only
for the snapshot.

Which series exist:
- `earshot_model_loaded{model,task}`: one series per *catalog* model, always: 1 while loaded, 0
  otherwise (an evicted model reads 0). The catalog is bounded (hub ids join it on demand, up to
  max_catalog_models), so this is a known, small set of series, and `sum(earshot_model_loaded)` /
  `earshot_model_loaded == 0` need no `or vector(0)` tricks.
- `earshot_model_loads_in_progress`, `earshot_model_idle_seconds`, `earshot_model_expires_in_seconds`
  (only while an expiry is scheduled), `earshot_model_in_use`, `earshot_model_memory_bytes`: only
  for models the cache holds right now (loaded or loading); they disappear when a model is evicted.
  A stuck load reads loads_in_progress 1 until it ends.
- Configuration gauges, always present (alerts and dashboards use them as the per-instance
  series): `earshot_cache_capacity_models` and `earshot_cache_memory_budget_bytes` read `+Inf`
  when unlimited; `earshot_cache_idle_timeout_seconds` reads `+Inf` when models never expire (-1)
  and 0 when they unload as soon as they are released; `earshot_model_load_timeout_seconds`.
- `earshot_cache_waiting_requests`: requests waiting in the cache (for a load or for room).

`earshot_model_memory_bytes` has one series per device the load was measured on ("cpu",
"cuda:0", ...); while a model's footprint is not measured (the measurement was unusable), its
estimate is exported under device="estimate".

`STATE_GAUGES` (names, help, labels) and `state_samples(snapshot, ...)` (the values) are shared with
the fleet (`earshot.fleet.metrics`), which sets Ray gauges from the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from earshot.cache.state import CacheSnapshot
from earshot.models.catalog import Catalog

INF = math.inf


class SnapshotSource(Protocol):
    def snapshot(self) -> CacheSnapshot: ...


# The snapshot a scrape took on the event loop, for the collector running in the worker thread.
_SCRAPE_SNAPSHOT: ContextVar[CacheSnapshot | None] = ContextVar("earshot_scrape_snapshot", default=None)


def render(registry: CollectorRegistry, snapshot: CacheSnapshot) -> bytes:
    """The exposition of `registry`, with the cache's gauges read from `snapshot` (any thread)."""
    token = _SCRAPE_SNAPSHOT.set(snapshot)
    try:
        return generate_latest(registry)
    finally:
        _SCRAPE_SNAPSHOT.reset(token)


def _limit(value: float | None) -> float:
    return INF if value is None else float(value)


def _idle_timeout(value: float) -> float:
    return INF if value < 0 else float(value)


@dataclass(frozen=True)
class GaugeDef:
    name: str
    documentation: str
    labels: tuple[str, ...] = ()


STATE_GAUGES: tuple[GaugeDef, ...] = (
    GaugeDef(
        "earshot_model_loaded",
        "1 while the catalog model is loaded, 0 otherwise (one series per catalog model).",
        ("model", "task"),
    ),
    GaugeDef(
        "earshot_model_loads_in_progress",
        "1 while a load of the model is in progress (a value that stays 1 is a stuck load).",
        ("model",),
    ),
    GaugeDef(
        "earshot_cache_waiting_requests",
        "Requests waiting in the model cache, for a load or for room.",
    ),
    GaugeDef(
        "earshot_model_idle_seconds",
        "Seconds since the loaded model's last reference went (absent while in use).",
        ("model",),
    ),
    GaugeDef(
        "earshot_model_expires_in_seconds",
        "Seconds until the idle model is unloaded (only while an expiry is scheduled).",
        ("model",),
    ),
    GaugeDef(
        "earshot_model_in_use",
        "References held on the model right now (requests using it).",
        ("model",),
    ),
    GaugeDef(
        "earshot_model_memory_bytes",
        "Measured footprint of the loaded model per device (device=estimate while unmeasured).",
        ("model", "device"),
    ),
    GaugeDef(
        "earshot_cache_capacity_models",
        "max_models: loaded models at most (+Inf: no limit).",
    ),
    GaugeDef(
        "earshot_cache_memory_budget_bytes",
        "memory_budget_bytes: sum of model footprints at most (+Inf: no limit).",
    ),
    GaugeDef(
        "earshot_cache_idle_timeout_seconds",
        "model_idle_timeout: seconds an unused model stays loaded (+Inf: never unloaded, "
        "0: unloaded after each request).",
    ),
    GaugeDef(
        "earshot_model_load_timeout_seconds",
        "model_load_timeout: seconds a load (or a wait for room) may take.",
    ),
)

Sample = tuple[tuple[str, ...], float]


def state_samples(
    snapshot: CacheSnapshot,
    catalog: Sequence[tuple[str, str]],
    ids: Collection[str] | None,
) -> dict[str, list[Sample]]:
    """The values of every `STATE_GAUGES` gauge for `snapshot`: name -> [(label values, value)].

    catalog: (model id, task) of every model that gets an `earshot_model_loaded` series (0 when not
        loaded). ids: the models whose state is exported (None: every model of the snapshot).
    """
    samples: dict[str, list[Sample]] = {g.name: [] for g in STATE_GAUGES}
    states = {m.id: m for m in snapshot.models if ids is None or m.id in ids}
    loaded = samples["earshot_model_loaded"]
    named = set()
    for model_id, task in catalog:
        named.add(model_id)
        state = states.get(model_id)
        loaded.append(((model_id, task), 1.0 if state is not None and state.loaded else 0.0))
    for model_id, state in states.items():
        if model_id not in named:  # a model of the snapshot outside `catalog` (ids=None)
            loaded.append(((model_id, state.task), 1.0 if state.loaded else 0.0))
        labels = (model_id,)
        samples["earshot_model_loads_in_progress"].append((labels, 1.0 if state.loading else 0.0))
        samples["earshot_model_in_use"].append((labels, float(state.in_use)))
        if state.idle_seconds is not None:
            samples["earshot_model_idle_seconds"].append((labels, max(0.0, state.idle_seconds)))
        if state.expires_at is not None:
            samples["earshot_model_expires_in_seconds"].append(
                (labels, max(0.0, state.expires_at - snapshot.at))
            )
        if state.loaded:
            memory = samples["earshot_model_memory_bytes"]
            if state.footprint:
                for device, nbytes in state.footprint.items():
                    memory.append(((model_id, device), float(nbytes)))
            elif state.footprint_bytes > 0:
                memory.append(((model_id, "estimate"), float(state.footprint_bytes)))
    samples["earshot_cache_waiting_requests"].append(((), float(snapshot.waiting_requests)))
    config = snapshot.config
    samples["earshot_cache_capacity_models"].append(((), _limit(config.max_models)))
    samples["earshot_cache_memory_budget_bytes"].append(((), _limit(config.memory_budget_bytes)))
    samples["earshot_cache_idle_timeout_seconds"].append(((), _idle_timeout(config.idle_timeout)))
    samples["earshot_model_load_timeout_seconds"].append(((), float(config.load_timeout)))
    return samples


class CacheStateCollector(Collector):
    """Gauges of the cache's state, built from one snapshot per scrape."""

    def __init__(self, cache: SnapshotSource, catalog: Catalog) -> None:
        self._cache = cache
        self._catalog_source = catalog
        self._refresh()
        catalog.on_add(self._refresh)  # a hub id resolved on demand gets its series once added

    def _refresh(self, _: object = None) -> None:
        """Label values prepared once per catalog change (start-up, and each model added later)."""
        catalog = self._catalog_source
        specs = catalog.specs
        self._catalog: tuple[tuple[str, str], ...] = tuple((i, specs[i].task.value) for i in catalog.ids())
        self._ids = frozenset(specs)

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        snapshot = _SCRAPE_SNAPSHOT.get() or self._cache.snapshot()
        families = self._families()
        samples = state_samples(snapshot, self._catalog, self._ids)
        for family in families:
            for labels, value in samples[family.name]:
                family.add_metric(list(labels), value)
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(g.name, g.documentation, labels=list(g.labels)) for g in STATE_GAUGES]
