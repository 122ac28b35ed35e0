"""Room waits are served in order (issue 17 item 3).

With max_models=1, clients looping on model a keep it in use at every instant: each release of a
is followed at once by another hit. A request for b must still get b loaded once the requests for
a that were in flight when b started waiting have finished: from then on, new requests for a
queue behind b's load instead of hitting. Deterministic: each "inference" lasts 1 s of a
FakeClock and the clients are staggered by 0.25 s, so at every tick one client releases and the
other three still hold a.
"""

from __future__ import annotations

import asyncio

from earshot.cache.errors import CacheError
from earshot.cache.events import Evicted, Hit, Loaded
from earshot.cache.lease import Lease
from tests.support.fakes import CacheHarness, cache_harness, eventually

TICK = 0.25
CLIENTS = 4


async def _client(h: CacheHarness, offset: float, served: list[int]) -> None:
    await h.clock.sleep(offset)
    while True:
        try:
            async with h.cache.acquire("a"):
                await h.clock.sleep(TICK * CLIENTS)  # one inference
                served.append(1)
        except CacheError:
            await h.clock.sleep(TICK)


async def _tick(h: CacheHarness) -> None:
    h.clock.advance(TICK)
    for _ in range(10):  # woken clients release and re-acquire; unloads and loads run in threads
        await asyncio.sleep(0.002)


async def test_a_load_waiting_for_room_gets_it_once_the_hits_in_flight_finish() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=60, max_waiting=16)
    await h.cache.load("a")
    served: list[int] = []
    clients = [asyncio.create_task(_client(h, i * TICK, served)) for i in range(CLIENTS)]
    b: asyncio.Task[Lease] | None = None
    try:
        for _ in range(8):  # two rounds: the clients now overlap, a is never idle
            await _tick(h)
        assert h.cache.snapshot().get("a").in_use >= CLIENTS - 1  # type: ignore[union-attr]
        hits_before = len(h.events.of(Hit, "a"))
        assert hits_before > 0
        b = asyncio.create_task(h.cache.load("b"))
        # b waits for room once its footprint estimate is in: a sleeper on the clock besides the clients.
        await eventually(lambda: h.clock.sleepers == CLIENTS + 1, what="b to wait for room")
        waiting_from = len(h.events.events)
        ticks = 0
        while not b.done() and ticks < 40:  # 40 ticks = 10 s, well past what fairness needs
            await _tick(h)
            ticks += 1
        assert b.done(), "b never got room: hits on a kept it in use"
        assert (await b).outcome == "miss"
        # No new hit on a was granted once b waited for room; a went once its requests finished.
        loaded_b = h.events.index(Loaded, "b")
        hits_between = [
            e for e in h.events.events[waiting_from:loaded_b] if isinstance(e, Hit) and e.model == "a"
        ]
        assert hits_between == []
        assert h.events.of(Evicted)[0].model == "a"  # (then b, idle, goes for the clients of a)
    finally:
        for task in [*clients, *([b] if b is not None else [])]:
            task.cancel()
        await asyncio.gather(*clients, *([b] if b is not None else []), return_exceptions=True)
        await h.cache.close()


async def test_requests_held_behind_a_waiting_load_count_as_waiting_and_go_on_after_it() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=60)
    release = asyncio.Event()

    async def hold_a() -> None:
        async with h.cache.acquire("a"):
            await release.wait()

    holder = asyncio.create_task(hold_a())
    await eventually(lambda: h.loaded_ids() == ["a"])
    b = asyncio.create_task(h.cache.load("b"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 1)
    late = asyncio.create_task(h.cache.load("a"))  # a is loaded, but held for b: it queues
    await eventually(lambda: h.cache.snapshot().waiting_requests == 2)
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.waiting == 1
    assert state.loaded
    assert not late.done()
    release.set()
    await holder
    assert (await b).outcome == "miss"
    assert (await late).outcome == "miss"  # a was evicted for b, then loaded again
    assert h.events.index(Loaded, "b") < len(h.events.events) - 1
    assert h.cache.snapshot().waiting_requests == 0
