"""Cache metrics: counters and histograms from events, and the snapshot collector's gauges.

Every test uses a fresh CollectorRegistry and reads exact sample values back from it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry, generate_latest

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
from earshot.cache.manager import ModelCache
from earshot.cache.protocol import ModelSpec, Task
from earshot.cache.state import CacheConfig, CacheSnapshot, ModelState
from earshot.models.catalog import Catalog
from earshot.observability.collector import CacheStateCollector
from earshot.observability.metrics import CacheMetrics
from tests.support.fakes import FakeBackend, FakeClock, InlineExecutor, eventually

STT = "stt-a"
TTS = "org/tts-b"
T0 = 1_700_000_000.0


def catalog(*extra: str) -> Catalog:
    specs = {
        STT: ModelSpec(id=STT, task=Task.TRANSCRIPTION, source="local"),
        TTS: ModelSpec(id=TTS, task=Task.SPEECH, source="hf", repo_id=TTS),
    }
    for i in extra:
        specs[i] = ModelSpec(id=i, task=Task.TRANSCRIPTION, source="local")
    return Catalog(specs=specs, aliases={"whisper-1": STT})


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> CacheMetrics:
    m = CacheMetrics(registry)
    m.bind(catalog())
    return m


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def scripted_events() -> Iterator[CacheEvent]:
    """2 hits, 1 miss, 3 coalesced; 1 idle and 1 capacity eviction; 1 reload; 1 failed load."""
    stt, tts = {"model": STT, "task": "transcription"}, {"model": TTS, "task": "speech"}
    yield Miss(**stt, at=T0)
    yield LoadStarted(**stt, at=T0, reload=False)
    for i in range(3):
        yield Coalesced(**stt, at=T0 + 0.1 * i)
    yield Loaded(**stt, at=T0 + 2.0, duration_s=2.0, footprint_bytes=1000, footprint={"cpu": 1000})
    yield Hit(**stt, at=T0 + 3)
    yield Hit(**stt, at=T0 + 4)
    yield Evicted(
        **stt,
        at=T0 + 700,
        reason=EvictionReason.IDLE,
        idle_s=400.0,
        resident_s=698.0,
        footprint_bytes=1000,
        released_bytes=900,
    )
    # reloaded within the thrash window, then pushed out for room two seconds after its last use
    yield LoadStarted(**stt, at=T0 + 710, reload=True)
    yield Loaded(**stt, at=T0 + 711.5, duration_s=1.5, footprint_bytes=1000, reload=True)
    yield Evicted(
        **stt,
        at=T0 + 740,
        reason=EvictionReason.CAPACITY,
        idle_s=2.0,
        resident_s=28.5,
        footprint_bytes=1000,
        released_bytes=1000,
    )
    yield LoadStarted(**tts, at=T0 + 741, reload=False)
    yield LoadFailed(
        **tts, at=T0 + 742, duration_s=1.0, error_kind=LoadFailureKind.FAILURE, message="bad files"
    )


def test_scripted_events_give_exact_counter_values(
    registry: CollectorRegistry, metrics: CacheMetrics
) -> None:
    for event in scripted_events():
        metrics(event)

    hits = value(registry, "earshot_cache_requests_total", model=STT, result="hit")
    misses = value(registry, "earshot_cache_requests_total", model=STT, result="miss")
    coalesced = value(registry, "earshot_cache_requests_total", model=STT, result="coalesced")
    assert (hits, misses, coalesced) == (2.0, 1.0, 3.0)
    assert hits / (hits + misses + coalesced) == pytest.approx(2 / 6)

    assert (
        value(registry, "earshot_model_loads_total", model=STT, task="transcription", outcome="success")
        == 2.0
    )
    assert value(registry, "earshot_model_loads_total", model=TTS, task="speech", outcome="failure") == 1.0
    # failures and timeouts are created at zero by bind(), so rate()/increase() see the first one
    assert value(registry, "earshot_model_loads_total", model=TTS, task="speech", outcome="timeout") == 0.0
    assert value(registry, "earshot_model_loads_total", model=TTS, task="speech", outcome="success") is None
    # load duration: successful loads only
    assert (
        value(registry, "earshot_model_load_duration_seconds_count", model=STT, task="transcription") == 2.0
    )
    assert value(registry, "earshot_model_load_duration_seconds_sum", model=STT, task="transcription") == 3.5
    assert (
        value(
            registry, "earshot_model_load_duration_seconds_bucket", model=STT, task="transcription", le="1.0"
        )
        == 0.0
    )
    assert (
        value(
            registry, "earshot_model_load_duration_seconds_bucket", model=STT, task="transcription", le="2.5"
        )
        == 2.0
    )
    assert value(registry, "earshot_model_load_duration_seconds_count", model=TTS, task="speech") is None

    assert value(registry, "earshot_model_evictions_total", model=STT, reason="idle") == 1.0
    assert value(registry, "earshot_model_evictions_total", model=STT, reason="capacity") == 1.0
    assert value(registry, "earshot_model_reloads_total", model=STT) == 1.0
    assert value(registry, "earshot_model_reloads_total", model=TTS) == 0.0

    # idle age at eviction, by reason: the capacity eviction of a model idle 2 s shows as thrash
    assert value(registry, "earshot_model_idle_at_eviction_seconds_count", reason="idle") == 1.0
    assert value(registry, "earshot_model_idle_at_eviction_seconds_sum", reason="idle") == 400.0
    assert (
        value(registry, "earshot_model_idle_at_eviction_seconds_bucket", reason="capacity", le="5.0") == 1.0
    )
    assert (
        value(registry, "earshot_model_idle_at_eviction_seconds_bucket", reason="capacity", le="1.0") == 0.0
    )
    assert value(registry, "earshot_model_residency_seconds_sum", reason="idle") == 698.0
    assert value(registry, "earshot_model_residency_seconds_sum", reason="capacity") == 28.5
    assert value(registry, "earshot_model_residency_seconds_count", reason="capacity") == 1.0


def test_model_ids_outside_the_catalog_never_become_labels(
    registry: CollectorRegistry, metrics: CacheMetrics
) -> None:
    bogus = ["../../etc/passwd", "whisper-1", "x" * 300, "stt-a\n"]  # an alias is not a catalog id either
    for model in bogus:
        metrics(Hit(model=model, task="transcription", at=T0))
        metrics(Loaded(model=model, task="transcription", at=T0, duration_s=1.0, footprint_bytes=1))
        metrics(
            Evicted(
                model=model,
                task="transcription",
                at=T0,
                reason=EvictionReason.IDLE,
                idle_s=1.0,
                resident_s=1.0,
                footprint_bytes=1,
                released_bytes=1,
            )
        )
        metrics.record_inference(model=model, task="transcription", duration_s=1.0, audio_s=3.0)
    text = generate_latest(registry).decode()
    samples = [
        line for line in text.splitlines() if line and not line.startswith("#") and "_created{" not in line
    ]
    # only the zero series bind() created for the catalog's own models exist
    assert samples
    assert [line for line in samples if not line.endswith(" 0.0")] == []
    assert {line.split('model="')[1].split('"')[0] for line in samples} <= set(catalog().specs)
    assert "passwd" not in text


def test_events_before_bind_are_dropped(registry: CollectorRegistry) -> None:
    metrics = CacheMetrics(registry)
    metrics(Hit(model=STT, task="transcription", at=T0))
    assert value(registry, "earshot_cache_requests_total", model=STT, result="hit") is None
    metrics.bind(catalog())
    metrics(Hit(model=STT, task="transcription", at=T0))
    assert value(registry, "earshot_cache_requests_total", model=STT, result="hit") == 1.0


def test_record_inference(registry: CollectorRegistry, metrics: CacheMetrics) -> None:
    metrics.record_inference(model=STT, task="transcription", duration_s=0.4, audio_s=11.0)
    metrics.record_inference(model=STT, task="transcription", duration_s=2.0, audio_s=30.0)
    # the task label comes from the catalog, not from the caller
    metrics.record_inference(model=TTS, task="bogus", duration_s=0.02, audio_s=2.5)
    assert value(registry, "earshot_inference_duration_seconds_count", model=STT, task="transcription") == 2.0
    assert value(registry, "earshot_inference_duration_seconds_sum", model=STT, task="transcription") == 2.4
    assert (
        value(
            registry, "earshot_inference_duration_seconds_bucket", model=STT, task="transcription", le="0.5"
        )
        == 1
    )
    assert value(registry, "earshot_audio_duration_seconds_total", model=STT, task="transcription") == 41.0
    assert value(registry, "earshot_audio_duration_seconds_total", model=TTS, task="speech") == 2.5
    assert value(registry, "earshot_inference_duration_seconds_count", model=TTS, task="bogus") is None


# ---------------------------------------------------------------------- the snapshot collector


class StaticCache:
    """A cache stand-in whose snapshot a test sets directly."""

    def __init__(self, snapshot: CacheSnapshot) -> None:
        self.snap = snapshot
        self.calls = 0

    def snapshot(self) -> CacheSnapshot:
        self.calls += 1
        return self.snap


def state(model_id: str, task: str = "transcription", **kw: object) -> ModelState:
    base: dict[str, object] = {
        "loaded": True,
        "loading": False,
        "loading_since": None,
        "loaded_at": T0,
        "last_used_at": T0,
        "idle_seconds": None,
        "expires_at": None,
        "in_use": 0,
        "pinned": False,
    }
    base.update(kw)
    return ModelState(id=model_id, task=task, **base)  # type: ignore[arg-type]


def test_collector_reads_the_snapshot(registry: CollectorRegistry) -> None:
    snap = CacheSnapshot(
        at=T0 + 100,
        models=(
            state(
                STT,
                idle_seconds=42.0,
                expires_at=T0 + 100 + 258.0,
                footprint=MappingProxyType({"cpu": 7, "cuda:0": 9}),
                footprint_bytes=16,
                footprint_measured=True,
            ),
            state(TTS, "speech", in_use=2, footprint_bytes=500),  # in use, unmeasured: the estimate
            state("not-in-catalog", idle_seconds=1.0),
        ),
        waiting_requests=3,
        config=CacheConfig(max_models=4, memory_budget_bytes=None, idle_timeout=-1, load_timeout=120),
    )
    cache = StaticCache(snap)
    registry.register(CacheStateCollector(cache, catalog("stt-c")))
    cache.calls = 0

    assert value(registry, "earshot_model_loaded", model=STT, task="transcription") == 1.0
    assert value(registry, "earshot_model_loaded", model=TTS, task="speech") == 1.0
    assert value(registry, "earshot_model_loaded", model="stt-c", task="transcription") == 0.0
    assert value(registry, "earshot_model_loads_in_progress", model=STT) == 0.0
    assert value(registry, "earshot_model_loads_in_progress", model="stt-c") is None
    assert value(registry, "earshot_model_idle_seconds", model=STT) == 42.0
    assert value(registry, "earshot_model_idle_seconds", model=TTS) is None  # in use
    assert value(registry, "earshot_model_expires_in_seconds", model=STT) == pytest.approx(258.0)
    assert value(registry, "earshot_model_expires_in_seconds", model=TTS) is None
    assert value(registry, "earshot_model_in_use", model=TTS) == 2.0
    assert value(registry, "earshot_model_in_use", model="stt-c") is None
    assert value(registry, "earshot_model_memory_bytes", model=STT, device="cpu") == 7.0
    assert value(registry, "earshot_model_memory_bytes", model=STT, device="cuda:0") == 9.0
    assert value(registry, "earshot_model_memory_bytes", model=TTS, device="estimate") == 500.0
    assert value(registry, "earshot_cache_waiting_requests") == 3.0
    assert value(registry, "earshot_cache_capacity_models") == 4.0
    assert value(registry, "earshot_cache_memory_budget_bytes") == math.inf
    assert value(registry, "earshot_cache_idle_timeout_seconds") == math.inf  # -1: never
    assert value(registry, "earshot_model_load_timeout_seconds") == 120.0
    assert "not-in-catalog" not in generate_latest(registry).decode()

    # a load in progress, and the defaults: no limit -> +Inf, idle timeout 0 -> 0
    cache.snap = CacheSnapshot(
        at=T0,
        models=(state(STT, loaded=False, loading=True, loading_since=T0, loaded_at=None),),
        waiting_requests=0,
        config=CacheConfig(idle_timeout=0),
    )
    assert value(registry, "earshot_model_loads_in_progress", model=STT) == 1.0
    assert value(registry, "earshot_model_loaded", model=STT, task="transcription") == 0.0
    assert value(registry, "earshot_model_memory_bytes", model=STT, device="estimate") is None
    assert value(registry, "earshot_cache_capacity_models") == math.inf
    assert value(registry, "earshot_cache_idle_timeout_seconds") == 0.0


def test_collector_describes_without_reading_the_cache(registry: CollectorRegistry) -> None:
    cache = StaticCache(CacheSnapshot(at=T0, models=(), waiting_requests=0, config=CacheConfig()))
    registry.register(CacheStateCollector(cache, catalog()))
    assert cache.calls == 0  # registration uses describe(), not a snapshot
    text = generate_latest(registry).decode()
    assert cache.calls == 1
    for name in (
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
    ):
        assert f"# TYPE {name} gauge" in text, name
        assert f"# HELP {name} " in text, name


# ---------------------------------------------------------------------- with the real cache


async def test_real_cache_idle_age_eviction_and_kept_counters(registry: CollectorRegistry) -> None:
    asyncio.get_running_loop().set_default_executor(InlineExecutor())
    clock = FakeClock(wall_start=T0)
    cat = catalog()
    metrics = CacheMetrics(registry)
    metrics.bind(cat)
    backend = FakeBackend(footprint=1234)
    cache = ModelCache(
        cat.resolve,
        {"transcription": backend, "speech": backend},
        CacheConfig(idle_timeout=300),
        observers=[metrics],
        clock=clock,
        memory_probe=backend.memory,
        release_memory=lambda: None,
    )
    registry.register(CacheStateCollector(cache, cat))
    try:
        async with cache.acquire(STT) as lease:
            assert lease.outcome == "miss"
            assert value(registry, "earshot_model_in_use", model=STT) == 1.0
            assert value(registry, "earshot_model_idle_seconds", model=STT) is None
        async with cache.acquire(STT):
            pass
        clock.advance(42.0)
        assert value(registry, "earshot_model_idle_seconds", model=STT) == pytest.approx(42.0, abs=0.1)
        assert value(registry, "earshot_model_expires_in_seconds", model=STT) == pytest.approx(258.0, abs=0.1)
        assert value(registry, "earshot_model_in_use", model=STT) == 0.0
        assert value(registry, "earshot_model_memory_bytes", model=STT, device="cpu") == 1234.0
        assert value(registry, "earshot_model_loaded", model=STT, task="transcription") == 1.0

        clock.advance(260.0)  # past the idle timeout: evicted (the unload runs in the cache's own pool)
        await eventually(
            lambda: value(registry, "earshot_model_evictions_total", model=STT, reason="idle") == 1.0
        )
        # the evicted model keeps its counters; its state gauges go away, `loaded` reads 0
        assert value(registry, "earshot_cache_requests_total", model=STT, result="miss") == 1.0
        assert value(registry, "earshot_cache_requests_total", model=STT, result="hit") == 1.0
        assert (
            value(registry, "earshot_model_loads_total", model=STT, task="transcription", outcome="success")
            == 1
        )
        assert value(registry, "earshot_model_loaded", model=STT, task="transcription") == 0.0
        for gauge in (
            "earshot_model_idle_seconds",
            "earshot_model_expires_in_seconds",
            "earshot_model_in_use",
        ):
            assert value(registry, gauge, model=STT) is None, gauge
        assert value(registry, "earshot_model_memory_bytes", model=STT, device="cpu") is None
        assert value(registry, "earshot_model_idle_at_eviction_seconds_sum", reason="idle") == pytest.approx(
            302.0
        )
    finally:
        await cache.close()


def test_bind_creates_the_series_alerts_count_from() -> None:
    """At zero before any event, so the first failure, reload or eviction shows in increase()."""
    for budget in (False, True):
        registry = CollectorRegistry()
        CacheMetrics(registry, memory_budget=budget).bind(catalog())
        for outcome in ("failure", "timeout"):
            assert (
                value(registry, "earshot_model_loads_total", model=STT, task="transcription", outcome=outcome)
                == 0.0
            )
        assert value(registry, "earshot_model_reloads_total", model=STT) == 0.0
        assert value(registry, "earshot_model_evictions_total", model=STT, reason="capacity") == 0.0
        memory = value(registry, "earshot_model_evictions_total", model=STT, reason="memory")
        assert memory == (0.0 if budget else None)  # no budget: nothing is ever evicted for memory
        assert value(registry, "earshot_cache_requests_total", model=STT, result="hit") is None
