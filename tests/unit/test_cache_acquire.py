"""acquire(): hit / miss / coalesced, single flight, leases, events, loads off the event loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from earshot.cache.errors import ModelLoadError, UnknownModel
from earshot.cache.events import CacheEvent, Coalesced, Hit, Loaded, LoadStarted, Miss
from earshot.cache.protocol import Task
from tests.support.fakes import FakeHandle, cache_harness, eventually, make_spec


async def test_first_request_misses_and_loads_then_hits() -> None:
    h = cache_harness()
    async with h.cache.acquire("a") as lease:
        assert lease.outcome == "miss"
        assert lease.spec.id == "a"
        assert isinstance(lease.handle, FakeHandle)
        assert lease.handle.model_id == "a"
        first = lease.handle
    async with h.cache.acquire("a") as lease:
        assert lease.outcome == "hit"
        assert lease.handle is first
    assert h.backend.load_calls["a"] == 1
    assert h.events.kinds("a") == ["cache_miss", "model_load_started", "model_loaded", "cache_hit"]
    loaded = h.events.of(Loaded, "a")[0]
    assert loaded.task == "transcription"
    assert loaded.reload is False
    assert h.events.of(LoadStarted, "a")[0].reload is False


async def test_concurrent_cold_requests_make_exactly_one_load() -> None:
    h = cache_harness()
    h.backend.block("a")
    outcomes: list[str] = []
    release = asyncio.Event()

    async def request() -> None:
        async with h.cache.acquire("a") as lease:
            outcomes.append(lease.outcome)
            await release.wait()

    tasks = [asyncio.create_task(request()) for _ in range(8)]
    await h.backend.wait_started("a")
    await eventually(lambda: h.cache.snapshot().waiting_requests == 8)
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.loading
    assert not state.loaded
    assert state.waiting == 8
    h.backend.unblock("a")
    await eventually(lambda: len(outcomes) == 8)
    assert sorted(outcomes) == ["coalesced"] * 7 + ["miss"]
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.in_use == 8
    assert state.waiting == 0
    release.set()
    await asyncio.gather(*tasks)
    assert h.backend.load_calls["a"] == 1
    assert len(h.events.of(Miss)) == 1
    assert len(h.events.of(Coalesced)) == 7
    assert len(h.events.of(Loaded)) == 1


async def test_coalesced_requests_share_the_one_handle() -> None:
    h = cache_harness()
    h.backend.block("a")
    handles: list[object] = []

    async def request() -> None:
        async with h.cache.acquire("a") as lease:
            handles.append(lease.handle)

    tasks = [asyncio.create_task(request()) for _ in range(3)]
    await h.backend.wait_started("a")
    await eventually(lambda: h.cache.snapshot().waiting_requests == 3)
    h.backend.unblock("a")
    await asyncio.gather(*tasks)
    assert len({id(handle) for handle in handles}) == 1


async def test_unknown_model_raises_and_publishes_nothing() -> None:
    h = cache_harness()
    with pytest.raises(UnknownModel, match="nope"):
        async with h.cache.acquire("nope"):
            pass
    assert h.events.events == []
    assert h.cache.snapshot().models == ()


async def test_model_of_a_task_without_backend_fails_to_load() -> None:
    h = cache_harness([make_spec("a")])
    h.cache._backends.pop(Task.TRANSCRIPTION.value)
    with pytest.raises(ModelLoadError, match="no backend"):
        async with h.cache.acquire("a"):
            pass
    assert h.cache.snapshot().models == ()


async def test_alias_resolves_to_the_canonical_entry() -> None:
    h = cache_harness(aliases={"whisper-1": "a"})
    async with h.cache.acquire("a"):
        pass
    async with h.cache.acquire("whisper-1") as lease:
        assert lease.outcome == "hit"
        assert lease.spec.id == "a"
    assert h.backend.load_calls["a"] == 1
    assert [m.id for m in h.cache.snapshot().models] == ["a"]


async def test_a_blocked_load_does_not_block_the_event_loop() -> None:
    h = cache_harness()
    h.backend.block("a")
    slow = asyncio.create_task(h.cache.load("a"))
    await h.backend.wait_started("a")
    # While a's load sits in its worker thread, another model loads and is served.
    async with asyncio.timeout(5):
        async with h.cache.acquire("b") as lease:
            assert lease.outcome == "miss"
    assert not slow.done()
    h.backend.unblock("a")
    assert (await slow).outcome == "miss"


async def test_snapshot_lists_most_recently_used_first() -> None:
    h = cache_harness(idle_timeout=-1)
    for model in ("a", "b", "c"):
        await h.cache.load(model)
    await h.cache.load("a")
    assert h.loaded_ids() == ["a", "c", "b"]
    async with h.cache.acquire("b"):
        assert h.loaded_ids()[0] == "b"


async def test_hit_event_carries_model_task_and_wall_time() -> None:
    h = cache_harness([make_spec("tts", Task.SPEECH)])
    await h.cache.load("tts")
    h.clock.advance(5)
    async with h.cache.acquire("tts"):
        pass
    hit = h.events.of(Hit)[0]
    assert (hit.model, hit.task, hit.at) == ("tts", "speech", h.clock.wall())


async def test_an_observer_that_raises_is_logged_and_breaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    h = cache_harness()
    seen: list[CacheEvent] = []

    def broken(event: CacheEvent) -> None:
        raise RuntimeError("observer bug")

    h.cache.subscribe(broken)
    h.cache.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="earshot.cache"):
        async with h.cache.acquire("a") as lease:
            assert lease.outcome == "miss"
        async with h.cache.acquire("a") as lease:
            assert lease.outcome == "hit"
    # Both observers were called for every event; the one after the broken one too.
    assert [e.kind for e in seen] == ["cache_miss", "model_load_started", "model_loaded", "cache_hit"]
    failures = [r for r in caplog.records if r.name == "earshot.cache" and "observer" in r.getMessage()]
    assert len(failures) == 4
    assert all(r.exc_info is not None for r in failures)
    assert h.cache.snapshot().get("a") is not None


async def test_subscribe_adds_an_observer_after_construction() -> None:
    h = cache_harness()
    await h.cache.load("a")
    late: list[CacheEvent] = []
    h.cache.subscribe(late.append)
    async with h.cache.acquire("a"):
        pass
    assert [e.kind for e in late] == ["cache_hit"]
