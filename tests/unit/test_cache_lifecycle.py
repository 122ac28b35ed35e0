"""Manual unload, load(pin=...), preload and ready, back-pressure (CacheBusy), close()."""

from __future__ import annotations

import asyncio
import logging

import pytest

from earshot.cache.errors import CacheBusy, CacheClosed, UnknownModel
from earshot.cache.events import Evicted, EvictionReason, Hit, LoadFailed
from earshot.cache.lease import Lease
from earshot.cache.manager import ModelCache
from tests.support.fakes import cache_harness, eventually, make_spec


async def _hold(cache: ModelCache, model: str, until: asyncio.Event, got: list[Lease]) -> None:
    async with cache.acquire(model) as lease:
        got.append(lease)
        await until.wait()


# ---------------------------------------------------------------- manual unload


async def test_unload_an_idle_model_now() -> None:
    h = cache_harness(idle_timeout=-1)
    await h.cache.load("a")
    assert await h.cache.unload("a") == "unloaded"
    assert [(e.model, e.reason) for e in h.events.of(Evicted)] == [("a", EvictionReason.MANUAL)]
    assert h.cache.snapshot().models == ()
    assert h.backend.unloads == 1
    assert h.memory.total == 0


async def test_unload_with_another_reason() -> None:
    h = cache_harness(idle_timeout=-1)
    await h.cache.load("a")
    assert await h.cache.unload("a", EvictionReason.SHUTDOWN) == "unloaded"
    assert h.events.of(Evicted)[0].reason is EvictionReason.SHUTDOWN


async def test_unload_of_a_model_not_loaded_and_of_an_unknown_one() -> None:
    h = cache_harness()
    assert await h.cache.unload("a") == "not_loaded"
    with pytest.raises(UnknownModel):
        await h.cache.unload("nope")
    assert h.events.events == []


async def test_unload_of_a_model_in_use_is_scheduled_for_its_last_release() -> None:
    h = cache_harness(idle_timeout=-1)
    async with h.cache.acquire("a") as first:
        assert await h.cache.unload("a") == "scheduled"
        assert h.loaded_ids() == ["a"]
        # New requests in the meantime are served and cancel nothing.
        async with h.cache.acquire("a") as second:
            assert second.outcome == "hit"
        await asyncio.sleep(0.01)
        assert h.events.of(Evicted) == []
        assert not first.handle.unloaded
    await eventually(lambda: bool(h.events.of(Evicted, "a")))
    assert h.events.of(Evicted, "a")[0].reason is EvictionReason.MANUAL
    assert h.cache.snapshot().models == ()
    assert h.backend.load_calls["a"] == 1


async def test_unload_of_a_model_still_loading_is_scheduled() -> None:
    h = cache_harness(idle_timeout=-1)
    h.backend.block("a")
    task = asyncio.create_task(h.cache.load("a"))
    await h.backend.wait_started("a")
    assert await h.cache.unload("a") == "scheduled"
    h.backend.unblock("a")
    assert (await task).outcome == "miss"
    await eventually(lambda: bool(h.events.of(Evicted, "a")))
    assert h.events.of(Evicted, "a")[0].reason is EvictionReason.MANUAL


async def test_unload_while_an_unload_is_under_way_waits_for_it() -> None:
    h = cache_harness(idle_timeout=-1)
    await h.cache.load("a")
    h.backend.block_unloads()
    first = asyncio.create_task(h.cache.unload("a"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(h.cache.unload("a"))
    await asyncio.sleep(0.01)
    assert not second.done()
    h.backend.unblock_unloads()
    assert await first == "unloaded"
    assert await second == "unloaded"
    assert h.backend.unloads == 1


# ---------------------------------------------------------------- load() and preload


async def test_load_returns_the_lease_and_holds_nothing() -> None:
    h = cache_harness(idle_timeout=-1)
    lease = await h.cache.load("a")
    assert lease.outcome == "miss"
    assert lease.spec.id == "a"
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.in_use == 0
    assert not state.pinned
    assert (await h.cache.load("a", pin=True)).outcome == "hit"
    assert h.cache.snapshot().get("a").pinned  # type: ignore[union-attr]


async def test_a_pin_survives_an_unload_and_a_reload() -> None:
    h = cache_harness(idle_timeout=60)
    await h.cache.load("a", pin=True)
    await h.cache.unload("a")
    await h.cache.load("a")
    assert h.cache.snapshot().get("a").pinned  # type: ignore[union-attr]


async def test_ready_is_true_at_once_without_preloads() -> None:
    h = cache_harness()
    assert h.cache.ready
    await h.cache.preload([])
    assert h.cache.ready


async def test_preload_loads_pins_and_turns_ready(caplog: pytest.LogCaptureFixture) -> None:
    h = cache_harness(idle_timeout=60, pin_preloaded=True)
    h.backend.block("a")
    h.backend.fail_next("b")
    task = h.cache.start_preload(["a", "b", "nope", "c"])
    assert not h.cache.ready  # already before the task first runs
    await h.backend.wait_started("a")
    assert not h.cache.ready
    # The cache keeps serving while preloading.
    async with h.cache.acquire("d") as lease:
        assert lease.outcome == "miss"
    await asyncio.sleep(0.01)
    assert "b" not in h.backend.started  # sequential: b waits for a
    with caplog.at_level(logging.INFO, logger="earshot.cache"):
        h.backend.unblock("a")
        await task
    assert h.cache.ready
    assert sorted(h.loaded_ids()) == ["a", "c", "d"]
    snapshot = h.cache.snapshot()
    assert snapshot.get("a").pinned
    assert snapshot.get("c").pinned
    assert not snapshot.get("d").pinned  # type: ignore[union-attr]
    assert len(h.events.of(LoadFailed, "b")) == 1
    errors = [
        r.getMessage() for r in caplog.records if r.name == "earshot.cache" and r.levelno >= logging.ERROR
    ]
    assert any("b" in m and "fake load failure" in m for m in errors)
    assert any("nope" in m for m in errors)
    assert h.backend.started == ["a", "d", "b", "c"]
    h.clock.advance(3600)
    await eventually(lambda: bool(h.events.of(Evicted, "d")))
    await asyncio.sleep(0.01)
    assert sorted(h.loaded_ids()) == ["a", "c"]  # pinned preloads do not expire; d did


async def test_preload_sequential_order_and_await() -> None:
    h = cache_harness(pin_preloaded=False)
    await h.cache.preload(["c", "a", "b"])
    assert h.backend.started == ["c", "a", "b"]
    assert h.cache.ready
    assert not any(m.pinned for m in h.cache.snapshot().models)


# ---------------------------------------------------------------- back-pressure


async def test_requests_beyond_max_waiting_get_cache_busy_at_once() -> None:
    h = cache_harness(max_waiting=2, idle_timeout=-1)
    await h.cache.load("c")
    h.backend.block("a")
    waiters = [asyncio.create_task(h.cache.load("a")) for _ in range(2)]
    await eventually(lambda: h.cache.snapshot().waiting_requests == 2)
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.waiting == 2
    with pytest.raises(CacheBusy, match="max_waiting_requests=2"):
        await h.cache.load("a")
    with pytest.raises(CacheBusy):
        await h.cache.load("b")
    assert h.cache.snapshot().get("b") is None  # a refused request starts nothing
    # Hits never wait, so they are served even now.
    async with h.cache.acquire("c") as lease:
        assert lease.outcome == "hit"
    h.backend.unblock("a")
    await asyncio.gather(*waiters)
    assert h.cache.snapshot().waiting_requests == 0
    assert (await h.cache.load("b")).outcome == "miss"
    assert h.backend.load_calls["a"] == 1


async def test_requests_waiting_for_room_count_as_waiting() -> None:
    h = cache_harness(max_models=1, max_waiting=1, idle_timeout=-1)
    release = asyncio.Event()
    held: list[Lease] = []
    holder = asyncio.create_task(_hold(h.cache, "a", release, held))
    await eventually(lambda: len(held) == 1)
    waiter = asyncio.create_task(h.cache.load("b"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 1)
    with pytest.raises(CacheBusy):
        await h.cache.load("c")
    release.set()
    await holder
    assert (await waiter).outcome == "miss"


# ---------------------------------------------------------------- close()


async def test_close_unloads_everything_with_reason_shutdown_and_refuses_new_requests() -> None:
    h = cache_harness(idle_timeout=60)
    await h.cache.load("a")
    await h.cache.load("b", pin=True)
    await asyncio.sleep(0.01)
    assert h.clock.sleepers == 1  # a's idle timer
    await h.cache.close()
    assert sorted((e.model, e.reason) for e in h.events.of(Evicted)) == [
        ("a", EvictionReason.SHUTDOWN),
        ("b", EvictionReason.SHUTDOWN),
    ]
    assert h.cache.snapshot().models == ()
    assert h.backend.live == []
    assert h.memory.total == 0
    assert h.clock.sleepers == 0  # the expiry task is gone
    with pytest.raises(CacheClosed):
        async with h.cache.acquire("a"):
            pass
    with pytest.raises(CacheClosed):
        await h.cache.load("c")
    await h.cache.close()  # idempotent
    assert len(h.events.of(Evicted)) == 2


async def test_close_waits_for_references_to_drop() -> None:
    h = cache_harness(idle_timeout=60, shutdown_grace=30)
    release = asyncio.Event()
    held: list[Lease] = []
    holder = asyncio.create_task(_hold(h.cache, "a", release, held))
    await eventually(lambda: len(held) == 1)
    closing = asyncio.create_task(h.cache.close())
    second_close = asyncio.create_task(h.cache.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    assert h.events.of(Evicted) == []
    with pytest.raises(CacheClosed):
        await h.cache.load("a")  # even a hit is refused while closing
    h.clock.advance(29)
    await asyncio.sleep(0.01)
    assert not closing.done()
    assert not held[0].handle.unloaded
    release.set()
    await holder
    await closing
    await second_close
    assert [(e.model, e.reason) for e in h.events.of(Evicted)] == [("a", EvictionReason.SHUTDOWN)]


async def test_close_unloads_anyway_after_the_grace_period() -> None:
    h = cache_harness(idle_timeout=60, shutdown_grace=30)
    release = asyncio.Event()
    held: list[Lease] = []
    holder = asyncio.create_task(_hold(h.cache, "a", release, held))
    await eventually(lambda: len(held) == 1)
    closing = asyncio.create_task(h.cache.close())
    await asyncio.sleep(0.01)
    h.clock.advance(30)
    await closing
    assert [(e.model, e.reason) for e in h.events.of(Evicted)] == [("a", EvictionReason.SHUTDOWN)]
    assert held[0].handle.unloaded
    release.set()
    await holder  # releasing a model unloaded by the shutdown is harmless
    assert h.cache.snapshot().models == ()


async def test_close_abandons_a_stuck_load_and_unloads_its_late_handle() -> None:
    h = cache_harness(shutdown_grace=5, load_timeout=600)
    h.backend.block("a")
    waiter = asyncio.create_task(h.cache.load("a"))
    await h.backend.wait_started("a")
    closing = asyncio.create_task(h.cache.close())
    await asyncio.sleep(0.01)
    h.clock.advance(5)
    await closing
    with pytest.raises(CacheClosed):
        await waiter
    assert len(h.events.of(LoadFailed, "a")) == 1
    h.backend.unblock("a")
    await eventually(lambda: h.backend.unloads == 1, what="the abandoned load's handle to be unloaded")
    assert h.backend.live == []


async def test_close_fails_loads_waiting_for_room_at_once() -> None:
    h = cache_harness(max_models=1, shutdown_grace=30, idle_timeout=-1)
    release = asyncio.Event()
    held: list[Lease] = []
    holder = asyncio.create_task(_hold(h.cache, "a", release, held))
    await eventually(lambda: len(held) == 1)
    waiter = asyncio.create_task(h.cache.load("b"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 1)
    closing = asyncio.create_task(h.cache.close())
    with pytest.raises(CacheClosed):
        await waiter
    assert h.backend.load_calls["b"] == 0
    release.set()
    await holder
    await closing


async def test_hits_are_counted_but_never_wait() -> None:
    h = cache_harness([make_spec("a")], idle_timeout=-1)
    await h.cache.load("a")
    for _ in range(100):
        async with h.cache.acquire("a"):
            pass
    assert len(h.events.of(Hit)) == 100
    assert h.cache.snapshot().waiting_requests == 0
