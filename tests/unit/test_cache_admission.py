"""earshot.cache.admission on its own: room in arrival order, the hold on the models the first
waiting load needs, CacheFull after load_timeout, trimming to budget, evicting idle on OOM.

A Table of entries made through the state machine, a FakeClock, and a fake `evict` that moves the
victim to EVICTING and, when the test says so, to GONE (as the cache's eviction task would)."""

from __future__ import annotations

import asyncio

import pytest

from earshot.cache.admission import Admission
from earshot.cache.entry import Entry, EntryState, Table
from earshot.cache.errors import CacheClosed, CacheFull
from earshot.cache.events import EvictionReason
from earshot.cache.state import CacheConfig
from earshot.cache.timing import Signal
from tests.support.fakes import FakeClock, make_entry


class Rig:
    def __init__(self, **config: object) -> None:
        self.table = Table()
        self.clock = FakeClock(start=0.0)
        self.changed = Signal()
        self.closing = False
        self.evicted: list[tuple[str, EvictionReason]] = []
        self.unloads: dict[str, asyncio.Future[None]] = {}
        self.admission = Admission(
            self.table,
            CacheConfig(**config),  # type: ignore[arg-type]
            self.clock,
            self.changed,
            self.evict,
            lambda: self.closing,
            lambda model_id: CacheClosed("closing", model=model_id),
        )

    def evict(self, entry: Entry, reason: EvictionReason) -> asyncio.Task[None]:
        entry.to(EntryState.EVICTING)
        self.evicted.append((entry.spec.id, reason))
        done = asyncio.get_running_loop().create_future()
        self.unloads[entry.spec.id] = done

        async def unload() -> None:
            await done
            entry.to(EntryState.GONE)
            self.changed.notify()

        return asyncio.get_running_loop().create_task(unload())

    def finish_unload(self, model_id: str) -> None:
        self.unloads[model_id].set_result(None)

    def release(self, entry: Entry) -> None:
        entry.refs -= 1
        self.changed.notify()

    def new(self, model_id: str, size: int = 1) -> Entry:
        return make_entry(model_id, size, state=EntryState.ADMITTING, table=self.table)


async def _spin(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_load_that_fits_is_admitted_at_once() -> None:
    rig = Rig(max_models=2)
    make_entry("a", 1, table=rig.table)
    b = rig.new("b")
    await rig.admission.admit(b)
    assert b.state is EntryState.LOADING
    assert b.admitted
    assert rig.admission.queue == ()
    assert rig.evicted == []


async def test_idle_victims_are_evicted_and_the_unload_awaited_before_admission() -> None:
    rig = Rig(max_models=1)
    make_entry("a", 1, table=rig.table)
    b = rig.new("b")
    task = asyncio.create_task(rig.admission.admit(b))
    await _spin()
    assert rig.evicted == [("a", EvictionReason.CAPACITY)]
    assert b.state is EntryState.ADMITTING  # a's memory is not back yet
    rig.finish_unload("a")
    await task
    assert b.state is EntryState.LOADING


async def test_room_is_served_in_arrival_order_and_the_first_ones_blockers_are_held() -> None:
    rig = Rig(max_models=1, load_timeout=60)
    a = make_entry("a", 1, table=rig.table, refs=1)  # in use
    b, c = rig.new("b"), rig.new("c")
    first = asyncio.create_task(rig.admission.admit(b))
    await _spin()
    second = asyncio.create_task(rig.admission.admit(c))
    await _spin()
    assert rig.admission.queue == (b, c)
    assert rig.admission.held == {"a"}  # new requests for a queue behind b
    rig.release(a)
    await _spin()
    assert rig.evicted == [("a", EvictionReason.CAPACITY)]
    rig.finish_unload("a")
    await first
    assert b.state is EntryState.LOADING
    assert c.state is EntryState.ADMITTING  # b holds the only slot now
    assert rig.admission.queue == (c,)
    assert rig.admission.held == frozenset()  # b is loading: nothing to hold for c
    b.to(EntryState.FAILED)
    rig.admission.withdraw(b)  # (no-op: b left the queue already)
    rig.changed.notify()
    await second
    assert c.state is EntryState.LOADING


async def test_a_later_load_does_not_take_room_an_earlier_one_waits_for() -> None:
    """Budget 10: b (8) waits for the in-use a (5) to go. c (2) would fit beside a right now, but
    b came first: c waits its turn, and goes once b is admitted (8 + 2 fit)."""
    rig = Rig(memory_budget_bytes=10, load_timeout=60)
    a = make_entry("a", 5, table=rig.table, refs=1)
    b, c = rig.new("b", 8), rig.new("c", 2)
    first = asyncio.create_task(rig.admission.admit(b))
    await _spin()
    second = asyncio.create_task(rig.admission.admit(c))
    await _spin()
    assert c.state is EntryState.ADMITTING  # 5 + 2 fits, but b came first
    assert rig.admission.held == {"a"}
    rig.release(a)
    await _spin()
    assert rig.evicted == [("a", EvictionReason.MEMORY)]
    rig.finish_unload("a")
    await asyncio.gather(first, second)
    assert b.state is EntryState.LOADING
    assert c.state is EntryState.LOADING


async def test_cache_full_after_load_timeout_and_the_queue_moves_on() -> None:
    rig = Rig(max_models=1, load_timeout=30)
    make_entry("a", 1, table=rig.table, refs=1)
    b, c = rig.new("b"), rig.new("c")
    first = asyncio.create_task(rig.admission.admit(b))
    await _spin()
    second = asyncio.create_task(rig.admission.admit(c))
    await _spin()
    rig.clock.advance(30)
    await _spin()
    with pytest.raises(CacheFull, match="waited 30s"):
        await first
    with pytest.raises(CacheFull, match="waited 30s"):
        await second
    assert rig.admission.queue == ()
    assert rig.admission.held == frozenset()


async def test_closing_stops_the_waits() -> None:
    rig = Rig(max_models=1)
    make_entry("a", 1, table=rig.table, refs=1)
    task = asyncio.create_task(rig.admission.admit(rig.new("b")))
    await _spin()
    rig.closing = True
    rig.changed.notify()
    with pytest.raises(CacheClosed):
        await task
    assert rig.admission.queue == ()


async def test_trim_to_budget_evicts_idle_lru() -> None:
    rig = Rig(memory_budget_bytes=10)
    make_entry("a", 4, table=rig.table)
    make_entry("b", 4, table=rig.table, refs=1)
    c = make_entry("c", 4, table=rig.table)
    c.footprint = {"cpu": 4}
    rig.admission.trim_to_budget()
    assert rig.evicted == [("a", EvictionReason.MEMORY)]


async def test_evict_idle_for_spares_pinned_while_an_unpinned_one_is_idle() -> None:
    rig = Rig()
    make_entry("p", 1, table=rig.table, pinned=True)
    make_entry("a", 1, table=rig.table)
    make_entry("used", 1, table=rig.table, refs=1)
    new = make_entry("new", 1, table=rig.table, state=EntryState.LOADING)
    task = asyncio.create_task(rig.admission.evict_idle_for(new))
    await _spin()
    assert rig.evicted == [("a", EvictionReason.MEMORY)]
    rig.finish_unload("a")
    await task
