"""The metrics earshot exports: the one list the ops tests (dashboards, alert rules) check against.

DESIGN.md §5 fixes these names and labels; the HTTP ones come from Litestar's PrometheusMiddleware
(prefix `earshot_http`, path templates as `path`), the process ones from prometheus_client's
default collectors, and `up` from Prometheus itself. A test against a live `/metrics` can use
`METRICS` and `exposition_names()` to check that earshot exports exactly what is listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["earshot", "http", "process", "prometheus"]


@dataclass(frozen=True)
class Metric:
    name: str  # as queried: counters with their `_total`, histograms without `_bucket`/`_sum`/`_count`
    kind: Kind
    labels: frozenset[str]  # labels the exporter sets (Prometheus adds `instance` and `job`)
    source: Source = "earshot"


def _m(name: str, kind: Kind, *labels: str, source: Source = "earshot") -> Metric:
    return Metric(name, kind, frozenset(labels), source)


_HTTP_LABELS = ("method", "path", "status_code", "app_name")

METRICS: tuple[Metric, ...] = (
    # cache events (observer)
    _m("earshot_cache_requests_total", "counter", "model", "result"),
    _m("earshot_model_loads_total", "counter", "model", "task", "outcome"),
    _m("earshot_model_load_duration_seconds", "histogram", "model", "task"),
    _m("earshot_model_evictions_total", "counter", "model", "reason"),
    _m("earshot_model_reloads_total", "counter", "model"),
    _m("earshot_model_idle_at_eviction_seconds", "histogram", "reason"),
    _m("earshot_model_residency_seconds", "histogram", "reason"),
    # cache state (collector, read from a snapshot at scrape time)
    _m("earshot_model_loads_in_progress", "gauge", "model"),
    _m("earshot_cache_waiting_requests", "gauge"),
    _m("earshot_model_loaded", "gauge", "model", "task"),
    _m("earshot_model_idle_seconds", "gauge", "model"),
    _m("earshot_model_expires_in_seconds", "gauge", "model"),
    _m("earshot_model_in_use", "gauge", "model"),
    _m("earshot_model_memory_bytes", "gauge", "model", "device"),
    # cache settings
    _m("earshot_cache_capacity_models", "gauge"),
    _m("earshot_cache_memory_budget_bytes", "gauge"),
    _m("earshot_cache_idle_timeout_seconds", "gauge"),
    _m("earshot_model_load_timeout_seconds", "gauge"),
    # inference
    _m("earshot_inference_duration_seconds", "histogram", "model", "task"),
    _m("earshot_audio_duration_seconds_total", "counter", "model", "task"),
    # realtime sessions (DESIGN §9; the gauge is `_open`: the counter's family takes the plain name).
    # The counters and the latency histogram are born with the first session, so only the gauge
    # (created at zero per transcription model) is listed for the live check.
    _m("earshot_realtime_sessions_open", "gauge", "model"),
    # audio decoding (earshot.audio.pool): reason = invalid/too_long/out_of_memory/crashed/timeout
    _m("earshot_audio_decode_failures_total", "counter", "reason"),
    # GPU (NVML sampler)
    _m("earshot_gpu_memory_used_bytes", "gauge", "gpu", "uuid"),
    _m("earshot_gpu_memory_total_bytes", "gauge", "gpu", "uuid"),
    _m("earshot_gpu_utilization_ratio", "gauge", "gpu", "uuid"),
    _m("earshot_gpu_process_memory_bytes", "gauge", "gpu", "uuid"),
    _m("earshot_gpu_available", "gauge"),
    # HTTP (Litestar PrometheusMiddleware, prefix earshot_http; errors count 5xx only)
    _m("earshot_http_requests_total", "counter", *_HTTP_LABELS, source="http"),
    _m("earshot_http_request_duration_seconds", "histogram", *_HTTP_LABELS, source="http"),
    _m("earshot_http_requests_in_progress", "gauge", *_HTTP_LABELS, source="http"),
    _m("earshot_http_requests_error_total", "counter", *_HTTP_LABELS, source="http"),
    # prometheus_client's default collectors (process on Linux, platform, gc)
    _m("process_cpu_seconds_total", "counter", source="process"),
    _m("process_virtual_memory_bytes", "gauge", source="process"),
    _m("process_resident_memory_bytes", "gauge", source="process"),
    _m("process_start_time_seconds", "gauge", source="process"),
    _m("process_open_fds", "gauge", source="process"),
    _m("process_max_fds", "gauge", source="process"),
    _m("python_info", "gauge", "implementation", "major", "minor", "patchlevel", "version", source="process"),
    _m("python_gc_objects_collected_total", "counter", "generation", source="process"),
    _m("python_gc_objects_uncollectable_total", "counter", "generation", source="process"),
    _m("python_gc_collections_total", "counter", "generation", source="process"),
    # Prometheus's own, per target
    _m("up", "gauge", source="prometheus"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})

# In a fleet (DESIGN §10) each worker exports the cache and inference metrics through Ray
# (earshot/fleet/metrics.py) with these labels on top; deploy/prometheus-fleet.yml keeps them.
# A single server's series have neither (a `worker=~".*"` matcher still matches them).
FLEET_LABELS = frozenset({"worker", "node"})
WORKER_METRICS = frozenset(
    {
        "earshot_cache_requests_total",
        "earshot_model_loads_total",
        "earshot_model_load_duration_seconds",
        "earshot_model_evictions_total",
        "earshot_model_reloads_total",
        "earshot_model_idle_at_eviction_seconds",
        "earshot_model_residency_seconds",
        "earshot_model_loads_in_progress",
        "earshot_cache_waiting_requests",
        "earshot_model_loaded",
        "earshot_model_idle_seconds",
        "earshot_model_expires_in_seconds",
        "earshot_model_in_use",
        "earshot_model_memory_bytes",
        "earshot_cache_capacity_models",
        "earshot_cache_memory_budget_bytes",
        "earshot_cache_idle_timeout_seconds",
        "earshot_model_load_timeout_seconds",
        "earshot_inference_duration_seconds",
        "earshot_audio_duration_seconds_total",
    }
)

# Closed sets of label values (DESIGN.md §5). `model`, `gpu`, `uuid`, `device` are open.
LABEL_VALUES: dict[str, frozenset[str]] = {
    "result": frozenset({"hit", "miss", "coalesced"}),
    "outcome": frozenset({"success", "failure", "timeout"}),
    "reason": frozenset({"idle", "capacity", "memory", "manual", "shutdown"}),
    "task": frozenset({"transcription", "speech"}),
    "path": frozenset(
        {
            "/v1/audio/transcriptions",
            "/v1/audio/translations",
            "/v1/audio/speech",
            "/v1/audio/voices",
            "/v1/models",
            "/v1/models/{model_id}",
            "/api/ps",
            "/api/ps/{model_id}",
            "/api/events",
            "/health",
            "/health/ready",
            "/api/config",
            "/metrics",
            "/v1/realtime",  # method="websocket": one request per session, its duration the handshake
        }
    ),
    "app_name": frozenset({"earshot"}),
    "ended": frozenset({"client", "idle", "error", "shutdown", "refused"}),
}

# Bucket bounds the histograms promise (first and last finite bucket), for the live check.
HISTOGRAM_RANGES: dict[str, tuple[float, float]] = {
    "earshot_model_load_duration_seconds": (0.1, 600.0),
    "earshot_inference_duration_seconds": (0.01, 300.0),
}


@dataclass(frozen=True)
class SeriesName:
    """A name as it appears in PromQL, resolved to the metric it belongs to."""

    metric: Metric
    suffix: str  # "", "_bucket", "_sum" or "_count"

    @property
    def labels(self) -> frozenset[str]:
        """Labels a selector of this name may match on."""
        extra = {"le"} if self.suffix == "_bucket" else set()
        if self.metric.source == "prometheus":
            return TARGET_LABELS
        fleet = FLEET_LABELS if self.metric.name in WORKER_METRICS else frozenset()
        return self.metric.labels | TARGET_LABELS | fleet | extra


def resolve(name: str) -> SeriesName | None:
    """The metric behind a series name (`..._bucket` -> its histogram), or None if unknown."""
    if name in BY_NAME:
        metric = BY_NAME[name]
        return None if metric.kind == "histogram" else SeriesName(metric, "")
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in BY_NAME and BY_NAME[base].kind == "histogram":
            return SeriesName(BY_NAME[base], suffix)
    return None


def exposition_names(*, created: bool = False) -> set[str]:
    """Every sample name earshot's /metrics can show (with `_created` ones if `created`)."""
    names: set[str] = set()
    for m in METRICS:
        if m.source == "prometheus":
            continue
        if m.kind == "histogram":
            names |= {m.name + "_bucket", m.name + "_sum", m.name + "_count"}
            if created:
                names.add(m.name + "_created")
        elif m.kind == "counter":
            names.add(m.name)
            if created:
                names.add(m.name.removesuffix("_total") + "_created")
        else:
            names.add(m.name)
    return names
