"""`earshot ps`: the table from GET /api/ps, `--watch` over the event stream, auth and errors."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from litestar import Litestar, get

from earshot.api.events import events_router
from earshot.cache.events import Evicted, EvictionReason, Hit, Loaded
from earshot.observability.events import EventLog
from earshot.ps import event_line, human_bytes, human_seconds, run_ps, sse_data
from tests.unit.test_events_api import publish, serving, wait_for

T0 = 1_700_000_000.0
MIB = 1024**2

PS: dict[str, Any] = {
    "models": [
        {
            "model": "faster-whisper-tiny.en",
            "task": "transcription",
            "size_bytes": 75 * MIB + MIB // 2,
            "size_measured": True,
            "loaded": True,
            "loading": False,
            "loaded_at": "2023-11-14T22:13:20.000+00:00",
            "last_used_at": "2023-11-14T22:14:00.000+00:00",
            "idle_seconds": 12.4,
            "expires_at": "2023-11-14T22:19:00.000+00:00",
            "keep_alive": 300.0,
            "in_use": 0,
            "pinned": False,
        },
        {
            "model": "kokoro-82m-v1.0-int8",
            "task": "speech",
            "size_bytes": 88 * MIB,
            "size_measured": False,
            "loaded": True,
            "loading": False,
            "idle_seconds": None,
            "expires_at": None,
            "keep_alive": 300.0,
            "in_use": 2,
            "pinned": True,
        },
        {
            "model": "Systran/faster-whisper-base",
            "task": "transcription",
            "size_bytes": 150 * MIB,
            "size_measured": False,
            "loaded": False,
            "loading": True,
            "idle_seconds": None,
            "expires_at": None,
            "keep_alive": 300.0,
            "in_use": 0,
            "pinned": False,
        },
        {
            "model": "faster-whisper-base",
            "task": "transcription",
            "size_bytes": 3 * 1024**3,
            "size_measured": True,
            "loaded": True,
            "loading": False,
            "idle_seconds": 7300.0,
            "expires_at": None,
            "keep_alive": -1,
            "in_use": 0,
            "pinned": False,
        },
    ],
    "waiting_requests": 0,
}

EXPECTED_TABLE = """\
MODEL                         TASK            SIZE         IDLE      EXPIRES IN   IN USE   PINNED
faster-whisper-tiny.en        transcription   75.5 MiB     12s       4m 47s       0        no
kokoro-82m-v1.0-int8          speech          ~88.0 MiB    -         never        2        yes
Systran/faster-whisper-base   transcription   ~150.0 MiB   loading   -            0        no
faster-whisper-base           transcription   3.0 GiB      2h 1m     never        0        no
"""


def mock_server(
    *, api_key: str | None = None, events: bytes = b"", seen: list[httpx.Request] | None = None
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return httpx.Response(401, json={"error": {"message": "Missing or invalid API key"}})
        if request.url.path == "/api/ps":
            return httpx.Response(200, json=PS)
        if request.url.path == "/api/events" and request.url.params.get("stream") == "true":
            return httpx.Response(200, content=events, headers={"content-type": "text/event-stream"})
        return httpx.Response(404, json={"error": {"message": "not found"}})

    return httpx.MockTransport(handler)


def run(*args: Any, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_ps(*args, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def test_table() -> None:
    code, out, err = run("http://earshot.test", None, False, transport=mock_server())
    assert (code, err) == (0, "")
    assert out == EXPECTED_TABLE


def test_empty_server_prints_the_header_only() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"models": []})

    code, out, _ = run("http://earshot.test/", None, False, transport=httpx.MockTransport(handler))
    assert code == 0
    assert out.split() == ["MODEL", "TASK", "SIZE", "IDLE", "EXPIRES", "IN", "IN", "USE", "PINNED"]


def test_bearer_token_is_sent_and_a_refusal_is_explained() -> None:
    seen: list[httpx.Request] = []
    code, out, _ = run(
        "http://earshot.test", "s3cret", False, transport=mock_server(api_key="s3cret", seen=seen)
    )
    assert code == 0
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    assert "faster-whisper-tiny.en" in out

    code, out, err = run("http://earshot.test", "wrong", False, transport=mock_server(api_key="s3cret"))
    assert (code, out) == (1, "")
    assert "refused the API key (HTTP 401)" in err


def test_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run(f"http://127.0.0.1:{port}", None, False)
    assert (code, out) == (1, "")
    assert err.startswith(f"earshot ps: cannot reach the server at http://127.0.0.1:{port}")


def test_not_an_earshot_server() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, text="<html>hello</html>"))
    code, _, err = run("http://example.test", None, False, transport=transport)
    assert code == 1
    assert "did not answer JSON" in err


def sse(*records: dict[str, Any]) -> bytes:
    chunks = [": earshot cache events\r\nretry: 3000\r\n\r\n"]
    chunks += [f"id: {r.get('id', '')}\r\ndata: {json.dumps(r)}\r\n\r\n" for r in records]
    chunks.append(": keepalive\r\n\r\n")
    return "".join(chunks).encode()


def test_watch_prints_one_line_per_event_and_fails_when_the_stream_ends() -> None:
    events = sse(
        {
            "id": 1,
            "event": "model_loaded",
            "model": "faster-whisper-tiny.en",
            "task": "transcription",
            "at": "2023-11-14T22:13:20.250+00:00",
            "duration_s": 1.2345,
            "footprint_bytes": 75 * MIB,
            "reload": False,
        },
        {"event": "events_dropped", "dropped": 12},
        {
            "id": 2,
            "event": "model_evicted",
            "model": "faster-whisper-tiny.en",
            "task": "transcription",
            "at": "2023-11-14T22:18:20.000+00:00",
            "reason": "idle",
            "idle_s": 300.0,
            "resident_s": 300.0,
            "footprint_bytes": 75 * MIB,
            "released_bytes": 70 * MIB,
        },
    )
    code, out, err = run("http://earshot.test", None, True, transport=mock_server(events=events))
    table, lines = out[: len(EXPECTED_TABLE)], out[len(EXPECTED_TABLE) :].splitlines()
    assert table == EXPECTED_TABLE
    assert len(lines) == 3
    assert lines[0].endswith(
        "model_loaded        faster-whisper-tiny.en (transcription)  "
        "duration_s=1.234 footprint=75.0 MiB reload=no"
    )
    assert lines[1] == "-- 12 events dropped: this client read too slowly --"
    assert "model_evicted" in lines[2]
    assert "reason=idle idle_s=300.000 resident_s=300.000 footprint=75.0 MiB released=70.0 MiB" in lines[2]
    assert code == 1
    assert "closed the event stream" in err


class Interrupted(httpx.SyncByteStream):
    """A stream that delivers one event, then the user presses Ctrl-C."""

    def __iter__(self) -> Iterator[bytes]:
        yield sse(
            {"id": 1, "event": "cache_hit", "model": "m", "task": "speech", "at": "2023-11-14T22:13:20Z"}
        )
        raise KeyboardInterrupt


def test_watch_ends_cleanly_on_ctrl_c() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/ps":
            return httpx.Response(200, json={"models": []})
        return httpx.Response(200, stream=Interrupted(), headers={"content-type": "text/event-stream"})

    code, out, err = run("http://earshot.test", None, True, transport=httpx.MockTransport(handler))
    assert code == 0
    assert err == ""
    assert "cache_hit           m (speech)" in out


@pytest.mark.parametrize("hits", [False, True])
def test_watch_against_the_real_events_endpoint(hits: bool) -> None:
    """Cache hits are shown only with --hits (one line per request otherwise floods the watch)."""
    log = EventLog(100)

    @get("/api/ps", sync_to_thread=False)
    def ps() -> dict[str, Any]:
        return PS

    with serving(Litestar([ps, events_router(log)])) as server:
        out, err = io.StringIO(), io.StringIO()
        result: list[int] = []
        thread = threading.Thread(
            target=lambda: result.append(run_ps(server.url, None, True, out=out, err=err, hits=hits))
        )
        thread.start()
        wait_for(lambda: log.subscribers == 1, "earshot ps to subscribe")
        publish(
            server,
            log,
            Hit(model="faster-whisper-tiny.en", task="transcription", at=T0),
            Loaded(model="kokoro-82m-v1.0-int8", task="speech", at=T0, duration_s=2.0, footprint_bytes=MIB),
            Evicted(
                model="kokoro-82m-v1.0-int8",
                task="speech",
                at=T0,
                reason=EvictionReason.MANUAL,
                idle_s=1.0,
                resident_s=2.0,
                footprint_bytes=MIB,
                released_bytes=MIB,
            ),
        )
        expected = ["cache_hit"] * hits + ["model_loaded", "model_evicted"]
        wait_for(lambda: out.getvalue().count("\n") >= 5 + len(expected), "the event lines")
        started = time.monotonic()
        server.call(log.close)  # shutdown: the stream ends at once, not at uvicorn's grace timeout
        thread.join(10)
        assert time.monotonic() - started < 2
    assert not thread.is_alive()
    lines = out.getvalue().splitlines()
    assert lines[:5] == EXPECTED_TABLE.splitlines()
    assert [line.split()[1] for line in lines[5:]] == expected
    assert "reason=manual" in lines[-1]
    assert result == [1]  # the server went away
    assert "closed the event stream" in err.getvalue()


def test_helpers() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * MIB + MIB // 10, 2 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.1 MiB",
        "2.0 TiB",
    ]
    assert [human_seconds(s) for s in (None, -3, 0.4, 59, 61, 3600, 90061)] == [
        "-",
        "0s",
        "0s",
        "59s",
        "1m 1s",
        "1h 0m",
        "1d 1h",
    ]
    assert list(sse_data(["data: a", "data: b", "", ": c", "id: 3", "", "data: d"])) == ["a\nb", "d"]
    line = event_line(
        {
            "id": 1,
            "event": "model_load_failed",
            "model": "m",
            "task": "speech",
            "at": None,
            "error": "bad files",
            "out_of_memory": False,
        }
    )
    assert line == '--:--:--.---  model_load_failed   m (speech)  error="bad files" out_of_memory=no'


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_reported(status: int) -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(status, json={"error": {"message": "boom"}}))
    code, _, err = run("http://earshot.test", None, False, transport=transport)
    assert code == 1
    assert f"HTTP {status}: boom" in err


def test_slow_server_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    started = time.monotonic()
    code, _, err = run("http://earshot.test", None, False, transport=httpx.MockTransport(handler))
    assert code == 1
    assert "did not answer in time" in err
    assert time.monotonic() - started < 5
