"""Logs: one JSON line per cache event, stdlib records as JSON too, request and trace ids on request lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from litestar import Litestar, get
from litestar.params import FromPath
from litestar.testing import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from earshot.cache.events import (
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
from earshot.observability.logging import (
    CacheEventLogger,
    RequestContextMiddleware,
    configure_logging,
    logging_plugin,
    request_id_from,
)
from earshot.observability.tracing import RouteSpanMiddleware, build_tracer_provider, tracing_plugin
from earshot.settings import Settings

T0 = 1_700_000_000.0
STT = {"model": "faster-whisper-tiny.en", "task": "transcription"}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Logging is process-global: put the root logger and structlog back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def configured(level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(Settings(log_level=level, log_format="json"), stream=stream)  # type: ignore[arg-type]
    return stream


def test_loaded_and_evicted_each_make_exactly_one_json_line() -> None:
    stream = configured()
    observer = CacheEventLogger()
    observer(
        Loaded(
            **STT,
            at=T0,
            duration_s=1.23456,
            footprint_bytes=75_000_000,
            footprint={"cpu": 75_000_000},
            reload=True,
        )
    )
    [loaded] = lines(stream)
    assert loaded["event"] == "model_loaded"
    assert loaded["level"] == "info"
    assert loaded["model"] == "faster-whisper-tiny.en"
    assert loaded["task"] == "transcription"
    assert loaded["duration_s"] == 1.235
    assert loaded["footprint_bytes"] == 75_000_000
    assert loaded["footprint"] == {"cpu": 75_000_000}
    assert loaded["reload"] is True
    assert loaded["logger"] == "earshot.cache.events"
    assert loaded["timestamp"].endswith("Z")

    observer(
        Evicted(
            **STT, at=T0 + 900, reason=EvictionReason.IDLE, idle_s=300.0004, resident_s=899.5,
            footprint_bytes=75_000_000, released_bytes=74_000_000,
        )
    )  # fmt: skip
    assert len(lines(stream)) == 2
    evicted = lines(stream)[1]
    assert evicted["event"] == "model_evicted"
    assert evicted["level"] == "info"
    assert evicted["reason"] == "idle"
    assert evicted["idle_s"] == 300.0
    assert evicted["resident_s"] == 899.5
    assert evicted["released_bytes"] == 74_000_000
    assert evicted["model"] == "faster-whisper-tiny.en"


def test_load_failures_warn_or_error_with_the_message() -> None:
    stream = configured()
    observer = CacheEventLogger()
    observer(
        LoadFailed(
            **STT, at=T0, duration_s=2.0, error_kind=LoadFailureKind.FAILURE, message="model.bin is corrupt"
        )
    )
    observer(
        LoadFailed(
            **STT, at=T0, duration_s=300.0, error_kind=LoadFailureKind.TIMEOUT, message="took too long"
        )
    )
    failure, timeout = lines(stream)
    assert (failure["event"], failure["level"], failure["outcome"]) == (
        "model_load_failed",
        "error",
        "failure",
    )
    assert failure["error"] == "model.bin is corrupt"
    assert (timeout["level"], timeout["outcome"], timeout["error"]) == ("warning", "timeout", "took too long")


def test_hits_misses_coalesced_are_debug_only() -> None:
    events = [Hit(**STT, at=T0), Miss(**STT, at=T0), Coalesced(**STT, at=T0)]
    stream = configured("INFO")
    observer = CacheEventLogger()
    for event in events:
        observer(event)
    observer(LoadStarted(**STT, at=T0, reload=False))
    assert [line["event"] for line in lines(stream)] == ["model_load_started"]

    stream = configured("DEBUG")
    for event in events:
        observer(event)
    debug = lines(stream)
    assert [line["event"] for line in debug] == ["cache_hit", "cache_miss", "cache_coalesced"]
    assert {line["level"] for line in debug} == {"debug"}


def test_stdlib_records_are_json_lines_too() -> None:
    stream = configured()
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("earshot.cache").warning("unloading model %s failed", "x", extra={"attempt": 2})
    logging.getLogger("some.library").debug("not shown at INFO")
    first, second = lines(stream)
    assert first == {
        **first,
        "event": "Started server process [42]",
        "level": "info",
        "logger": "uvicorn.error",
    }
    assert second["event"] == "unloading model x failed"
    assert second["level"] == "warning"
    assert second["attempt"] == 2


def test_console_format_is_not_json() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="console"), stream=stream)
    CacheEventLogger()(LoadStarted(**STT, at=T0, reload=False))
    text = stream.getvalue()
    assert "model_load_started" in text
    assert "faster-whisper-tiny.en" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_request_id_validation() -> None:
    assert request_id_from("abc-123") == "abc-123"
    for bad in (None, "", "has space", "x" * 129, 'quote"d', "new\nline"):
        generated = request_id_from(bad)
        assert generated != bad
        assert len(generated) == 32


def test_request_lines_carry_request_and_trace_ids() -> None:
    stream = io.StringIO()
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(None, exporter=exporter)
    app_log = structlog.get_logger("earshot.test")

    @get("/work/{item:str}", sync_to_thread=False)
    def work(item: FromPath[str]) -> dict[str, str]:
        app_log.info("working", item=item)
        logging.getLogger("earshot.test.stdlib").info("stdlib line")
        CacheEventLogger()(LoadStarted(**STT, at=T0, reload=False))
        return {"ok": item}

    app = Litestar(
        [work],
        plugins=[logging_plugin(Settings(), stream=stream), tracing_plugin(provider)],
        middleware=[RequestContextMiddleware(), RouteSpanMiddleware()],
    )
    with TestClient(app) as client:
        given = client.get("/work/a", headers={"X-Request-ID": "req-42"})
        generated = client.get("/work/b")
    assert given.headers["x-request-id"] == "req-42"
    new_id = generated.headers["x-request-id"]
    assert len(new_id) == 32

    request_lines = [line for line in lines(stream) if line["logger"].startswith("earshot")]
    assert len(request_lines) == 6
    spans = {s.context.trace_id: s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"}
    for line, request_id in zip(request_lines, ["req-42"] * 3 + [new_id] * 3, strict=True):
        assert line["request_id"] == request_id
        server = spans[int(line["trace_id"], 16)]  # the trace of that request's server span
        assert server.attributes is not None
        assert server.attributes["earshot.request_id"] == request_id
        assert len(line["span_id"]) == 16
    assert {s.name for s in spans.values()} == {"GET /work/{item}"}  # the route, not the raw path
    # and nothing is left bound after the request
    structlog.get_logger("earshot.test").info("after")
    assert "request_id" not in lines(stream)[-1]
