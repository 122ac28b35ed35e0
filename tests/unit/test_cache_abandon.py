"""Work for clients who left (issue 17 item 4, the cache's part).

A request cancelled while it waits (for a load, for room, for an unload, behind a hold) leaves
the waiting count at once. A load that no request waits for any more is abandoned if it has not
reached backend.load: nothing is loaded for a request that is gone. A backend.load already running
finishes, and the model stays cached, idle (documented in ModelCache).
"""

from __future__ import annotations

import asyncio

from earshot.cache.events import Evicted, Loaded, LoadStarted
from tests.support.fakes import CacheHarness, cache_harness, eventually


async def _hold(h: CacheHarness, model: str, release: asyncio.Event) -> None:
    async with h.cache.acquire(model):
        await release.wait()


async def _cancel(task: asyncio.Task[object]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_load_waiting_for_room_is_abandoned_when_its_only_request_leaves() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=60)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(h, "a", release))
    await eventually(lambda: h.loaded_ids() == ["a"])
    waiter = asyncio.create_task(h.cache.load("b"))  # an explicit load() is a request too
    await eventually(lambda: h.cache.snapshot().waiting_requests == 1)
    await _cancel(waiter)
    # The load is gone without a's release: no time passes on the cache's clock. (Polled, not read
    # after one loop step: the load's footprint estimate may still be finishing in a worker thread,
    # which once made a single sleep(0) too short on a loaded CI machine.)
    await eventually(
        lambda: h.cache.snapshot().waiting_requests == 0 and h.cache.snapshot().get("b") is None,
        what="the abandoned load of b gone",
    )
    release.set()
    await holder
    await asyncio.sleep(0.02)
    assert h.backend.load_calls["b"] == 0
    assert h.events.of(LoadStarted, "b") == []
    assert h.events.of(Evicted) == []  # and a was not evicted for a load nobody wanted
    assert h.loaded_ids() == ["a"]
    # The next request for b starts afresh.
    assert (await h.cache.load("b")).outcome == "miss"


async def test_a_load_with_one_request_left_goes_on() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=60)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(h, "a", release))
    await eventually(lambda: h.loaded_ids() == ["a"])
    first = asyncio.create_task(h.cache.load("b"))
    second = asyncio.create_task(h.cache.load("b"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 2)
    await _cancel(first)
    assert h.cache.snapshot().waiting_requests == 1
    release.set()
    await holder
    assert (await second).outcome == "coalesced"
    assert h.backend.loads_ok["b"] == 1


async def test_a_load_already_running_finishes_and_stays_cached() -> None:
    h = cache_harness(idle_timeout=-1)
    h.backend.block("a")
    waiter = asyncio.create_task(h.cache.load("a"))
    await h.backend.wait_started("a")
    await _cancel(waiter)
    assert h.cache.snapshot().waiting_requests == 0
    h.backend.unblock("a")
    await eventually(lambda: bool(h.events.of(Loaded, "a")))
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.loaded
    assert state.in_use == 0
    assert (await h.cache.load("a")).outcome == "hit"


async def test_a_request_cancelled_while_an_unload_runs_leaves_the_count() -> None:
    h = cache_harness(idle_timeout=-1)
    await h.cache.load("a")
    h.backend.block_unloads()
    unloading = asyncio.create_task(h.cache.unload("a"))
    await eventually(lambda: h.backend.unloads_started == ["a"])
    waiter = asyncio.create_task(h.cache.load("a"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 1)
    await _cancel(waiter)
    assert h.cache.snapshot().waiting_requests == 0
    h.backend.unblock_unloads()
    assert await unloading == "unloaded"
    await asyncio.sleep(0.02)
    assert h.backend.load_calls["a"] == 1  # nothing reloaded for the request that left


async def test_a_request_held_behind_a_waiting_load_leaves_the_count_when_cancelled() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=60)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(h, "a", release))
    await eventually(lambda: h.loaded_ids() == ["a"])
    b = asyncio.create_task(h.cache.load("b"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 1)
    held = asyncio.create_task(h.cache.load("a"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 2)
    await _cancel(held)
    assert h.cache.snapshot().waiting_requests == 1
    release.set()
    await holder
    assert (await b).outcome == "miss"


async def test_abandoned_waiters_do_not_fill_max_waiting() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=60, max_waiting=3)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(h, "a", release))
    await eventually(lambda: h.loaded_ids() == ["a"])
    for _ in range(3):  # clients that time out and leave, again and again
        gone = [asyncio.create_task(h.cache.load(m)) for m in ("b", "c", "d")]
        await eventually(lambda: h.cache.snapshot().waiting_requests == 3)
        for task in gone:
            await _cancel(task)
        assert h.cache.snapshot().waiting_requests == 0
    assert h.cache.snapshot().models[0].id == "a"
    assert len(h.cache.snapshot().models) == 1
    release.set()
    await holder
    assert sum(h.backend.load_calls.values()) == 1
