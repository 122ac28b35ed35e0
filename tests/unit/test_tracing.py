"""Traces: `model.load` spans from cache events, `cache.acquire` with its outcome, the server span."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from litestar import Litestar, get
from litestar.params import FromPath
from litestar.testing import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from earshot.cache.errors import UnknownModel
from earshot.cache.events import Loaded, LoadFailed, LoadFailureKind, LoadStarted
from earshot.cache.manager import ModelCache
from earshot.cache.protocol import ModelSpec, Task
from earshot.cache.state import CacheConfig
from earshot.models.catalog import Catalog
from earshot.observability import tracing
from earshot.observability.tracing import (
    LoadSpanObserver,
    RouteSpanMiddleware,
    build_tracer_provider,
    otlp_traces_url,
    traced_acquire,
    tracing_plugin,
)
from tests.support.fakes import FakeBackend

T0 = 1_700_000_000.0
STT = {"model": "faster-whisper-tiny.en", "task": "transcription"}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    p = build_tracer_provider(None, exporter=exporter)
    yield p
    p.shutdown()


def spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_model_load_span_from_load_started_to_loaded(
    exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    observer = LoadSpanObserver(provider.get_tracer("test"))
    observer(LoadStarted(**STT, at=T0, reload=True))
    assert spans(exporter, "model.load") == []  # still open
    observer(
        Loaded(
            **STT,
            at=T0 + 2.5,
            duration_s=2.5,
            footprint_bytes=3000,
            footprint={"cpu": 1000, "cuda:0": 2000},
            reload=True,
        )
    )
    [span] = spans(exporter, "model.load")
    assert span.attributes == {
        "earshot.model": "faster-whisper-tiny.en",
        "earshot.task": "transcription",
        "earshot.reload": True,
        "earshot.load.outcome": "success",
        "earshot.footprint_bytes": 3000,
        "earshot.footprint_measured": True,
        "earshot.footprint_bytes.cpu": 1000,
        "earshot.footprint_bytes.cuda:0": 2000,
    }
    assert span.start_time == int(T0 * 1e9)
    assert span.end_time == int((T0 + 2.5) * 1e9)
    assert span.status.status_code is not StatusCode.ERROR
    assert span.resource.attributes["service.name"] == "earshot"


def test_failed_load_span_is_an_error_with_the_message(
    exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    observer = LoadSpanObserver(provider.get_tracer("test"))
    observer(LoadStarted(**STT, at=T0, reload=False))
    observer(
        LoadFailed(
            **STT, at=T0 + 300, duration_s=300.0, error_kind=LoadFailureKind.TIMEOUT, message="too slow"
        )
    )
    [span] = spans(exporter, "model.load")
    assert span.attributes is not None
    assert span.attributes["earshot.load.outcome"] == "timeout"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "too slow"
    assert span.end_time is not None
    assert span.start_time is not None
    assert (span.end_time - span.start_time) / 1e9 == pytest.approx(300.0)


def catalog() -> Catalog:
    spec = ModelSpec(id=STT["model"], task=Task.TRANSCRIPTION, source="local")
    return Catalog(specs={spec.id: spec})


async def test_cache_acquire_spans_with_outcomes_and_the_load_under_the_miss(
    exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    tracer = provider.get_tracer("test")
    backend = FakeBackend()
    cache = ModelCache(
        catalog().resolve,
        {"transcription": backend},
        CacheConfig(),
        observers=[LoadSpanObserver(tracer)],
        memory_probe=backend.memory,
        release_memory=lambda: None,
    )
    model = STT["model"]
    try:
        backend.block(model)
        with tracer.start_as_current_span("request") as request:

            async def second() -> str:
                await backend.wait_started(model)
                async with traced_acquire(cache, model, tracer=tracer) as lease:
                    return lease.outcome

            waiter = asyncio.create_task(second())
            first = asyncio.create_task(_acquire_and_infer(cache, model, tracer))
            await backend.wait_started(model)
            await asyncio.sleep(0.05)
            backend.unblock(model)
            assert await first == "miss"
            assert await waiter == "coalesced"
            async with traced_acquire(cache, model, tracer=tracer) as lease:
                assert lease.outcome == "hit"
    finally:
        await cache.close()

    acquires = spans(exporter, "cache.acquire")
    outcomes = sorted(s.attributes["earshot.cache.outcome"] for s in acquires if s.attributes)
    assert outcomes == ["coalesced", "hit", "miss"]
    for span in acquires:
        assert span.attributes is not None
        assert span.attributes["earshot.model"] == model
        assert span.attributes["earshot.task"] == "transcription"
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id
    [miss] = [s for s in acquires if s.attributes and s.attributes["earshot.cache.outcome"] == "miss"]
    [load] = spans(exporter, "model.load")
    assert load.parent is not None
    assert load.parent.span_id == miss.context.span_id  # the load ran for the request that missed
    [inference] = spans(exporter, "inference")
    assert inference.parent is not None
    assert inference.parent.span_id == request.get_span_context().span_id  # a sibling, not a child
    assert miss.end_time is not None
    assert inference.start_time is not None
    assert miss.end_time <= inference.start_time  # acquire's span covers the wait only


async def _acquire_and_infer(cache: ModelCache, model: str, tracer: trace.Tracer) -> str:
    async with traced_acquire(cache, model, tracer=tracer) as lease:
        with tracer.start_as_current_span("inference"):
            await asyncio.sleep(0)
        return lease.outcome


async def test_failed_acquire_is_recorded_on_the_span(
    exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    cache = ModelCache(catalog().resolve, {"transcription": FakeBackend()}, CacheConfig())
    tracer = provider.get_tracer("test")
    with pytest.raises(UnknownModel):
        async with traced_acquire(cache, "no-such-model", tracer=tracer):
            pass
    await cache.close()
    [span] = spans(exporter, "cache.acquire")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert "earshot.cache.outcome" not in span.attributes
    assert [e.name for e in span.events] == ["exception"]


def test_server_span_named_by_route_and_scrapes_untraced(
    exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    @get("/v1/models/{model_id:path}", sync_to_thread=False)
    def model(model_id: FromPath[str]) -> dict[str, str]:
        return {"id": model_id}

    @get("/metrics", sync_to_thread=False)
    def metrics() -> str:
        return "ok"

    app = Litestar([model, metrics], plugins=[tracing_plugin(provider)], middleware=[RouteSpanMiddleware()])
    with TestClient(app) as client:
        client.get("/v1/models/Systran/faster-whisper-base")
        client.get("/metrics")
        client.get("/no/such/route")
    servers = [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.SERVER]
    names = sorted(s.name for s in servers)
    # a raw path never names a span (unrouted requests keep the bare method); /metrics is not traced
    assert names == ["GET", "GET /v1/models/{model_id}"]
    [routed] = [s for s in servers if s.name != "GET"]
    assert routed.attributes is not None
    assert routed.attributes["http.route"] == "/v1/models/{model_id}"


def test_otlp_url_and_exporter_choice() -> None:
    assert otlp_traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert otlp_traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert otlp_traces_url("https://x.example/otlp/v1/traces") == "https://x.example/otlp/v1/traces"
    with_otlp = build_tracer_provider("http://127.0.0.1:9/")
    processors = with_otlp._active_span_processor._span_processors
    assert [type(p).__name__ for p in processors] == ["BatchSpanProcessor"]
    assert processors[0].span_exporter._endpoint == "http://127.0.0.1:9/v1/traces"  # type: ignore[attr-defined]
    with_otlp.shutdown()
    assert build_tracer_provider(None)._active_span_processor._span_processors == ()


def test_global_provider_is_installed_only_once(monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[TracerProvider] = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    first, second = TracerProvider(), TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    assert tracing.install_global(first) is True
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: first)
    assert tracing.install_global(second) is False
    assert installed == [first]
