"""GET /api/events on a tiny Litestar app wiring only the events router.

The JSON listing goes through Litestar's TestClient. The SSE stream needs a real server: Litestar's
and httpx's in-process transports collect the whole response body before returning it, and an event
stream never ends. So those tests run uvicorn on a free port in a thread and read the stream with
httpx, event by event, as a client would.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from litestar import Litestar
from litestar.testing import TestClient

from earshot.api.events import events_router
from earshot.cache.events import CacheEvent, Loaded, Miss
from earshot.observability.events import EventLog

T0 = 1_700_000_000.0
STT = {"model": "faster-whisper-tiny.en", "task": "transcription"}


def app_for(log: EventLog, keepalive: float = 15.0) -> Litestar:
    return Litestar([events_router(log, keepalive=keepalive)])


def test_json_listing_with_limit_and_after() -> None:
    log = EventLog(50)
    for i in range(5):
        log(Miss(**STT, at=T0 + i))
    with TestClient(app_for(log)) as client:
        everything = client.get("/api/events").json()
        newest = client.get("/api/events", params={"limit": 2}).json()
        after = client.get("/api/events", params={"after": 3}).json()
        bad = client.get("/api/events", params={"limit": 0})
    assert [e["id"] for e in everything["events"]] == [1, 2, 3, 4, 5]
    assert everything["events"][0] == {
        "id": 1, "event": "cache_miss", "model": "faster-whisper-tiny.en", "task": "transcription",
        "at": "2023-11-14T22:13:20.000+00:00",
    }  # fmt: skip
    assert [e["id"] for e in newest["events"]] == [4, 5]
    assert [e["id"] for e in after["events"]] == [4, 5]
    assert bad.status_code == 400


class Server:
    """uvicorn serving `app` on 127.0.0.1 in a thread; `call` runs a function on its event loop."""

    def __init__(self, app: Litestar) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, lifespan="off", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        asyncio.run(main())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn: Callable[[], Any]) -> Any:
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)


@contextmanager
def serving(app: Litestar) -> Iterator[Server]:
    server = Server(app)
    server.thread.start()
    deadline = time.monotonic() + 10
    while not server.server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.server.should_exit = True
        server.thread.join(10)


def read_events(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    """The next `count` SSE messages, as {"id", "data", "comments"}."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] = {"comments": []}
    for line in lines:
        if line == "":
            if "data" in current or current["comments"]:
                out.append(current)
                if len(out) == count:
                    return out
            current = {"comments": []}
        elif line.startswith(":"):
            current["comments"].append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            current[name] = value.strip()
    raise AssertionError(f"stream ended after {len(out)} of {count} messages")


def publish(server: Server, log: EventLog, *events: CacheEvent) -> None:
    """Publish on the server's loop, as the cache does."""
    server.call(lambda: [log(e) for e in events])


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.timeout(30)
def test_stream_sends_new_events_as_they_happen_and_keepalives() -> None:
    log = EventLog(50)
    log(Miss(**STT, at=T0))  # old: not sent to a client that connects without Last-Event-ID
    with (
        serving(app_for(log, keepalive=0.3)) as server,
        httpx.Client(base_url=server.url, timeout=5) as client,
        client.stream("GET", "/api/events", params={"stream": "true"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        [hello] = read_events(lines, 1)
        assert hello["comments"] == ["earshot cache events"]
        wait_for(lambda: log.subscribers == 1, "the stream to subscribe")
        publish(
            server, log, Loaded(**STT, at=T0 + 1, duration_s=0.5, footprint_bytes=10), Miss(**STT, at=T0 + 2)
        )
        loaded, hit = read_events(lines, 2)
        assert loaded["id"] == "2"
        assert json.loads(loaded["data"])["event"] == "model_loaded"
        assert json.loads(loaded["data"])["duration_s"] == 0.5
        assert (hit["id"], json.loads(hit["data"])["event"]) == ("3", "cache_miss")
        [keepalive] = read_events(lines, 1)  # nothing happens for 0.3 s
        assert keepalive["comments"] == ["keepalive"]
        assert "data" not in keepalive
    # the client went away: its subscription is gone
    assert log.subscribers == 0


@pytest.mark.timeout(30)
def test_reconnect_with_last_event_id_replays_what_was_missed() -> None:
    log = EventLog(50)
    for i in range(5):
        log(Miss(**STT, at=T0 + i))
    with (
        serving(app_for(log)) as server,
        httpx.Client(base_url=server.url, timeout=5) as client,
        client.stream(
            "GET", "/api/events", params={"stream": "true"}, headers={"Last-Event-ID": "3"}
        ) as response,
    ):
        lines = response.iter_lines()
        _hello, four, five = read_events(lines, 3)
        assert [four["id"], five["id"]] == ["4", "5"]
        wait_for(lambda: log.subscribers == 1, "the stream to subscribe")
        publish(server, log, Miss(**STT, at=T0 + 9))
        [six] = read_events(lines, 1)
        assert six["id"] == "6"


@pytest.mark.timeout(30)
def test_a_client_that_does_not_read_never_blocks_publishing() -> None:
    log = EventLog(10_000)
    with (
        serving(app_for(log)) as server,
        httpx.Client(base_url=server.url, timeout=5) as client,
        client.stream("GET", "/api/events", params={"stream": "true"}) as response,
    ):
        lines = response.iter_lines()  # (a dropped line iterator would close the connection)
        read_events(lines, 1)
        wait_for(lambda: log.subscribers == 1, "the stream to subscribe")
        # the client reads nothing more: 5,000 events are published without waiting for it
        started = time.perf_counter()
        publish(server, log, *[Miss(**STT, at=T0 + i) for i in range(5000)])
        assert time.perf_counter() - started < 2.0
        assert log.last_id == 5000
        # when it reads again: what fitted in its queue, then where the rest was dropped
        queued = read_events(lines, 256)
        assert [m["id"] for m in queued] == [str(i) for i in range(1, 257)]
        publish(server, log, Miss(**STT, at=T0 + 5001))
        gap, newest = read_events(lines, 2)
        assert json.loads(gap["data"]) == {"event": "events_dropped", "dropped": 5000 - 256}
        assert "id" not in gap
        assert newest["id"] == "5001"


async def test_lifecycle_events_survive_steady_hits() -> None:
    """3 loads and 2 evictions, then 5,000 hits: the 1,000-record ring still holds all five (and
    the loads' starts), and no hit; the hits are still counted by the cache's observers."""
    from earshot.cache.events import EvictionReason, Hit
    from tests.support.fakes import cache_harness

    harness = cache_harness(("a", "b", "c"), max_models=2)
    log = EventLog(1000)
    harness.cache.subscribe(log)
    for model in ("a", "b", "c"):  # c evicts a (capacity)
        await harness.cache.load(model)
    await harness.cache.unload("b", EvictionReason.MANUAL)
    for _ in range(5000):
        async with harness.cache.acquire("c"):
            pass
    with TestClient(app_for(log)) as client:
        events = client.get("/api/events").json()["events"]
    kinds = [e["event"] for e in events]
    assert [e["model"] for e in events if e["event"] == "model_loaded"] == ["a", "b", "c"]
    assert [(e["model"], e["reason"]) for e in events if e["event"] == "model_evicted"] == [
        ("a", "capacity"),
        ("b", "manual"),
    ]
    assert "cache_hit" not in kinds
    assert len(harness.events.of(Hit)) == 5000
