"""FleetMetrics without a cluster: the Ray metric classes replaced by recorders, so the rules are
checked fast (tests/fleet/test_fleet_prometheus.py runs the real path through Ray and Prometheus).

What is checked: every series carries worker and node; the counters the alerts count from exist
at 0 once a model is known; events become the same increments as on the single server; the state
gauges follow the snapshot, a model that left it reads 0 (Ray cannot remove a series); an
unlimited limit is exported as the largest float (Ray drops +Inf); with a catalog, only its models
become labels and each has a loaded series; start() runs in the loop, stop() zeroes.
"""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from earshot.cache.events import Evicted, EvictionReason, Hit, Loaded, LoadStarted, Miss
from earshot.cache.protocol import ModelSpec, Task
from earshot.cache.state import CacheConfig, CacheSnapshot, ModelState
from earshot.fleet import metrics as fleet_metrics
from earshot.fleet.metrics import UNLIMITED, FleetMetrics
from earshot.models.catalog import Catalog
from tests.ops.known_metrics import WORKER_METRICS

STT = "stt-a"
TTS = "tts-b"
T0 = 1_700_000_000.0
WORKER = {"worker": "r1", "node": "10.0.0.5"}


class Recorder:
    """Counter, Gauge and Histogram of ray.serve.metrics, keeping what was recorded."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        self.module = SimpleNamespace(
            Counter=self._make("counter"), Gauge=self._make("gauge"), Histogram=self._make("histogram")
        )

    def _make(self, kind: str) -> Any:
        recorder = self

        class Metric:
            def __init__(
                self, name: str, description: str = "", boundaries: Any = None, tag_keys: Any = ()
            ) -> None:
                assert name not in recorder.metrics, f"{name} made twice"
                self.kind, self.name, self.tag_keys = kind, name, tuple(tag_keys)
                self.values: dict[frozenset[tuple[str, str]], float] = {}
                self.observations: list[tuple[dict[str, str], float]] = []
                recorder.metrics[name] = self

            def _key(self, tags: dict[str, str]) -> frozenset[tuple[str, str]]:
                assert set(tags) == set(self.tag_keys), (self.name, tags)
                return frozenset(tags.items())

            def _record(self, value: float, tags: dict[str, str]) -> None:
                key = self._key(tags)
                self.values[key] = self.values.get(key, 0.0) + value

            def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
                assert value > 0  # Ray refuses 0
                self._record(value, tags or {})

            def set(self, value: float, tags: dict[str, str] | None = None) -> None:
                self.values[self._key(tags or {})] = value

            def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
                self._key(tags or {})
                self.observations.append((dict(tags or {}), value))

        return Metric

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics[name].values.get(frozenset({**WORKER, **labels}.items()))


@pytest.fixture
def ray_metrics(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(fleet_metrics, "serve_metrics", recorder.module)
    return recorder


def catalog() -> Catalog:
    specs = {
        STT: ModelSpec(id=STT, task=Task.TRANSCRIPTION, source="local"),
        TTS: ModelSpec(id=TTS, task=Task.SPEECH, source="local"),
    }
    return Catalog(specs=specs, aliases={})


def state(model: str, **kw: Any) -> ModelState:
    base: dict[str, Any] = {
        "id": model,
        "task": "transcription",
        "loaded": True,
        "loading": False,
        "loading_since": None,
        "loaded_at": T0,
        "last_used_at": T0,
        "idle_seconds": 5.0,
        "expires_at": T0 + 60,
        "in_use": 0,
        "pinned": False,
        "footprint": {"cpu": 1000},
        "footprint_bytes": 1000,
        "footprint_measured": True,
    }
    return ModelState(**{**base, **kw})


def snapshot(*models: ModelState, config: CacheConfig | None = None) -> CacheSnapshot:
    return CacheSnapshot(at=T0, models=models, waiting_requests=0, config=config or CacheConfig(max_models=2))


def test_the_worker_metrics_are_made_with_worker_and_node(ray_metrics: Recorder) -> None:
    FleetMetrics(worker="r1", node="10.0.0.5")
    assert set(ray_metrics.metrics) == WORKER_METRICS  # the list the dashboards and tests use
    for metric in ray_metrics.metrics.values():
        assert metric.tag_keys[:2] == ("worker", "node"), metric.name


def test_events_count_as_on_the_single_server(ray_metrics: Recorder) -> None:
    m = FleetMetrics(worker="r1", node="10.0.0.5")
    m.observer(Miss(model=STT, task="transcription", at=T0))
    # Known from its first event: the alert series exist at 0 before anything failed.
    for outcome in ("failure", "timeout"):
        assert (
            ray_metrics.value("earshot_model_loads_total", model=STT, task="transcription", outcome=outcome)
            == 0
        )
    assert ray_metrics.value("earshot_model_evictions_total", model=STT, reason="capacity") == 0
    assert ray_metrics.value("earshot_model_reloads_total", model=STT) == 0
    m.observer(LoadStarted(model=STT, task="transcription", at=T0, reload=True))
    m.observer(Loaded(model=STT, task="transcription", at=T0, duration_s=1.5, footprint_bytes=10))
    m.observer(Hit(model=STT, task="transcription", at=T0))
    m.observer(
        Evicted(
            model=STT,
            task="transcription",
            at=T0,
            reason=EvictionReason.CAPACITY,
            idle_s=2.0,
            resident_s=30.0,
            footprint_bytes=10,
            released_bytes=10,
        )
    )
    m.record_inference(model=STT, task="transcription", duration_s=0.5, audio_s=11.0)
    assert ray_metrics.value("earshot_cache_requests_total", model=STT, result="miss") == 1
    assert ray_metrics.value("earshot_cache_requests_total", model=STT, result="hit") == 1
    assert (
        ray_metrics.value("earshot_model_loads_total", model=STT, task="transcription", outcome="success")
        == 1
    )
    assert ray_metrics.value("earshot_model_reloads_total", model=STT) == 1
    assert ray_metrics.value("earshot_model_evictions_total", model=STT, reason="capacity") == 1
    assert ray_metrics.value("earshot_audio_duration_seconds_total", model=STT, task="transcription") == 11.0
    (load,) = ray_metrics.metrics["earshot_model_load_duration_seconds"].observations
    assert load == ({**WORKER, "model": STT, "task": "transcription"}, 1.5)
    (idle,) = ray_metrics.metrics["earshot_model_idle_at_eviction_seconds"].observations
    assert idle == ({**WORKER, "reason": "capacity"}, 2.0)


def test_state_gauges_follow_the_snapshot(ray_metrics: Recorder) -> None:
    m = FleetMetrics(worker="r1", node="10.0.0.5")
    m.observer(Miss(model=STT, task="transcription", at=T0))
    m.update(snapshot(state(STT, in_use=1, idle_seconds=None, expires_at=None)))
    assert ray_metrics.value("earshot_model_loaded", model=STT, task="transcription") == 1
    assert ray_metrics.value("earshot_model_in_use", model=STT) == 1
    assert ray_metrics.value("earshot_model_memory_bytes", model=STT, device="cpu") == 1000
    assert ray_metrics.value("earshot_cache_capacity_models") == 2
    # No memory budget, models never expire: +Inf on the single server; Ray drops +Inf.
    assert ray_metrics.value("earshot_cache_memory_budget_bytes") == UNLIMITED == sys.float_info.max
    m.update(snapshot(state(STT), config=CacheConfig(max_models=2, idle_timeout=-1)))
    assert ray_metrics.value("earshot_cache_idle_timeout_seconds") == UNLIMITED
    assert ray_metrics.value("earshot_model_idle_seconds", model=STT) == 5.0
    assert ray_metrics.value("earshot_model_expires_in_seconds", model=STT) == 60.0
    # Evicted: every per-model gauge reads 0 (never left at its last value).
    m.update(snapshot())
    assert ray_metrics.value("earshot_model_loaded", model=STT, task="transcription") == 0
    for name in ("earshot_model_in_use", "earshot_model_idle_seconds", "earshot_model_expires_in_seconds"):
        assert ray_metrics.value(name, model=STT) == 0, name
    assert ray_metrics.value("earshot_model_memory_bytes", model=STT, device="cpu") == 0
    assert ray_metrics.value("earshot_model_loads_in_progress", model=STT) == 0


def test_with_a_catalog_only_its_models_are_labels(ray_metrics: Recorder) -> None:
    m = FleetMetrics(worker="r1", node="10.0.0.5", catalog=catalog())
    m.update(snapshot(state("stranger")))
    m.observer(Miss(model="stranger", task="transcription", at=T0))
    # Every catalog model has a loaded series (0), the stranger none.
    loaded = ray_metrics.metrics["earshot_model_loaded"].values
    assert {dict(k)["model"]: v for k, v in loaded.items()} == {STT: 0.0, TTS: 0.0}
    assert ray_metrics.value("earshot_cache_requests_total", model="stranger", result="miss") is None
    assert ray_metrics.value("earshot_model_loads_total", model=TTS, task="speech", outcome="failure") == 0


async def test_start_updates_in_the_loop_and_stop_zeroes(ray_metrics: Recorder) -> None:
    m = FleetMetrics(worker="r1", node="10.0.0.5")
    m.observer(Miss(model=STT, task="transcription", at=T0))
    current = [snapshot(state(STT, waiting=0))]
    m.start(lambda: current[0], 0.01)
    assert ray_metrics.value("earshot_model_loaded", model=STT, task="transcription") == 1  # at once
    current[0] = CacheSnapshot(at=T0, models=(state(STT),), waiting_requests=3, config=CacheConfig())
    for _ in range(200):
        if ray_metrics.value("earshot_cache_waiting_requests") == 3:
            break
        await asyncio.sleep(0.01)
    assert ray_metrics.value("earshot_cache_waiting_requests") == 3
    with pytest.raises(RuntimeError):
        m.start(lambda: current[0])
    m.stop()
    await asyncio.sleep(0.05)
    assert ray_metrics.value("earshot_model_loaded", model=STT, task="transcription") == 0
    assert ray_metrics.value("earshot_model_memory_bytes", model=STT, device="cpu") == 0


def test_start_outside_a_loop_is_refused(ray_metrics: Recorder) -> None:
    m = FleetMetrics(worker="r1", node="10.0.0.5")
    with pytest.raises(RuntimeError):
        m.start(lambda: snapshot())
