"""Observability of the real app: real backends, the demo models, real requests (CPU).

- /metrics carries every DESIGN §5 name, with values after some traffic;
- 1,000 requests for unknown models add no series at all;
- one truth, four views: what the cache did reads the same in /metrics, /api/events, the log
  lines, the `model.load` spans and /api/ps.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from litestar import Litestar
from litestar.testing import TestClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from earshot.backends import default_backends
from earshot.main import create_app
from earshot.observability import Observability
from earshot.settings import Settings
from tests.unit.test_metrics_scrape import DESIGN_NAMES

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
KOKORO = "kokoro-82m-v1.0-int8"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def observability_of(app: Litestar) -> Observability:
    """The app's Observability (main.py keeps it in the app's state)."""
    obs = app.state["observability"]
    assert isinstance(obs, Observability)
    return obs


def series(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


Server = tuple[TestClient[Litestar], InMemorySpanExporter, io.StringIO]


@pytest.fixture
def server(models_dir: Path) -> Iterator[Server]:
    """The app with its log lines going to a buffer and its spans to an in-memory exporter."""
    settings = Settings(models_dir=models_dir, max_models=1, builtin_hub_models=False, log_level="INFO")
    app = create_app(settings, backends=default_backends(device="cpu"), registry=CollectorRegistry())
    logs = io.StringIO()
    [handler] = logging.getLogger().handlers  # the one handler the app's logging config installed
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(logs)
    exporter = InMemorySpanExporter()
    observability_of(app).tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    with TestClient(app, timeout=300) as client:
        yield client, exporter, logs


def transcribe(client: TestClient[Litestar], audio: bytes) -> str:
    response = client.post(
        "/v1/audio/transcriptions", files={"file": ("jfk.flac", audio, "audio/flac")}, data={"model": TINY}
    )
    assert response.status_code == 200, response.text
    text: str = response.json()["text"]
    return text


def speak(client: TestClient[Litestar]) -> None:
    voices = client.get("/v1/audio/voices", params={"model": KOKORO}).json()["data"]
    response = client.post(
        "/v1/audio/speech",
        json={
            "model": KOKORO,
            "input": "Hello world.",
            "voice": voices[0]["voice"],
            "response_format": "wav",
        },
    )
    assert response.status_code == 200, response.text


def log_lines(logs: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logs.getvalue().splitlines()]  # every line is JSON


def test_metrics_events_logs_spans_and_ps_tell_one_story(server: Server, jfk_flac: Path) -> None:
    client, exporter, logs = server
    audio = jfk_flac.read_bytes()
    # max_models=1: tiny (miss, load), tiny (hit), kokoro (evicts tiny for room), tiny (reload,
    # evicts kokoro), then a manual unload
    assert "ask not what your country" in transcribe(client, audio).lower()
    transcribe(client, audio)
    speak(client)
    transcribe(client, audio)
    ps = client.get("/api/ps").json()
    events = client.get("/api/events").json()["events"]
    metrics = series(client.get("/metrics").text)
    lines = [line for line in log_lines(logs) if line.get("logger") == "earshot.cache.events"]

    def m(name: str, **labels: str) -> float:
        return metrics.get((name, frozenset(labels.items())), 0.0)

    kinds = Counter((e["event"], e["model"]) for e in events)
    logged = Counter((line["event"], line["model"]) for line in lines)
    load_spans = [s for s in exporter.get_finished_spans() if s.name == "model.load"]
    for model, task in ((TINY, "transcription"), (KOKORO, "speech")):
        loads = kinds["model_loaded", model]
        assert loads == m("earshot_model_loads_total", model=model, task=task, outcome="success")
        assert loads == logged["model_loaded", model]
        assert loads == sum(1 for s in load_spans if s.attributes and s.attributes["earshot.model"] == model)
        assert m("earshot_model_load_duration_seconds_sum", model=model, task=task) == pytest.approx(
            sum(e["duration_s"] for e in events if e["event"] == "model_loaded" and e["model"] == model)
        )
        acquires = [
            s for s in exporter.get_finished_spans()
            if s.name == "cache.acquire" and s.attributes and s.attributes["earshot.model"] == model
        ]  # fmt: skip
        for result in ("hit", "miss", "coalesced"):
            counted = m("earshot_cache_requests_total", model=model, result=result)
            assert counted == sum(
                1 for s in acquires if s.attributes and s.attributes["earshot.cache.outcome"] == result
            )
            # hits are counted, not kept in the event ring (steady traffic would push loads out of it)
            assert kinds[f"cache_{result}", model] == (0 if result == "hit" else counted)
        reloads = sum(
            1 for e in events if e["event"] == "model_load_started" and e["model"] == model and e["reload"]
        )
        assert reloads == m("earshot_model_reloads_total", model=model)
        for reason in ("idle", "capacity", "memory", "manual", "shutdown"):
            evicted = sum(
                1
                for e in events
                if e["event"] == "model_evicted" and e["model"] == model and e["reason"] == reason
            )
            assert evicted == m("earshot_model_evictions_total", model=model, reason=reason)
            assert evicted == sum(
                1
                for line in lines
                if line["event"] == "model_evicted" and line["model"] == model and line["reason"] == reason
            )

    # the story itself
    assert kinds["model_loaded", TINY] == 2
    assert m("earshot_model_reloads_total", model=TINY) == 1
    assert m("earshot_model_evictions_total", model=TINY, reason="capacity") == 1
    assert m("earshot_model_evictions_total", model=KOKORO, reason="capacity") == 1
    assert m("earshot_cache_requests_total", model=TINY, result="hit") == 1
    assert m("earshot_inference_duration_seconds_count", model=TINY, task="transcription") == 3
    assert m("earshot_audio_duration_seconds_total", model=TINY, task="transcription") == pytest.approx(33.0)
    assert m("earshot_inference_duration_seconds_count", model=KOKORO, task="speech") == 1

    # state: /api/ps, the gauges and the events agree on what is loaded now, and on its size
    [entry] = ps["models"]
    assert entry["model"] == TINY
    assert m("earshot_model_loaded", model=TINY, task="transcription") == 1
    assert m("earshot_model_loaded", model=KOKORO, task="speech") == 0
    last_load = [e for e in events if e["event"] == "model_loaded" and e["model"] == TINY][-1]
    assert entry["size_bytes"] == last_load["footprint_bytes"]
    assert (
        sum(v for (name, labels), v in metrics.items() if name == "earshot_model_memory_bytes")
        == entry["size_bytes"]
    )
    assert m("earshot_model_in_use", model=TINY) == 0
    assert m("earshot_model_idle_seconds", model=TINY) >= entry["idle_seconds"]
    assert m("earshot_cache_capacity_models") == 1

    # every request's cache lines carry its request id and trace id
    assert all(line.get("request_id") and line.get("trace_id") for line in lines)

    # a manual unload shows up everywhere too
    assert client.delete(f"/api/ps/{TINY}").status_code == 200
    after = series(client.get("/metrics").text)
    assert (
        after[("earshot_model_evictions_total", frozenset({"model": TINY, "reason": "manual"}.items()))] == 1
    )
    assert after[("earshot_model_loaded", frozenset({"model": TINY, "task": "transcription"}.items()))] == 0
    assert ("earshot_model_idle_seconds", frozenset({"model": TINY}.items())) not in after
    assert client.get("/api/events", params={"limit": 1}).json()["events"][0]["reason"] == "manual"
    assert client.get("/api/ps").json()["models"] == []


def test_every_design_name_and_no_series_from_unknown_models(server: Server, jfk_flac: Path) -> None:
    client, _, _ = server
    transcribe(client, jfk_flac.read_bytes())
    text = client.get("/metrics").text
    for name in DESIGN_NAMES:
        assert re.search(rf"^# TYPE {name} ", text, re.MULTILINE), name
    assert "earshot_http_requests_total{" in text
    assert 'path="/v1/audio/transcriptions"' in text

    def unknown(i: int) -> None:
        assert client.post("/v1/audio/speech", json={"model": f"nope-{i}", "input": "hi"}).status_code == 404
        # an owner/name id is looked up on the Hub: offline and not cached, 503 (test_hub_models.py)
        assert client.get(f"/v1/models/nope/{i}").status_code in (404, 503)
        files = {"file": ("a.flac", b"x", "audio/flac")}
        assert client.post(
            "/v1/audio/transcriptions", files=files, data={"model": f"nope-{i}"}
        ).status_code in (
            400,
            404,
        )

    unknown(0)  # the 404 series of these routes exist from here on
    before = set(series(client.get("/metrics").text))
    for i in range(1, 1000):
        unknown(i)
    text = client.get("/metrics").text
    assert set(series(text)) == before
    assert "nope" not in text
    assert (
        series(text)[
            (
                "earshot_http_requests_total",
                frozenset(
                    {
                        "app_name": "earshot",
                        "method": "POST",
                        "path": "/v1/audio/speech",
                        "status_code": "404",
                    }.items()
                ),
            )
        ]
        == 1000
    )
