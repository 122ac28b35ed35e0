"""Room: max_models and the memory budget by LRU, waiting for a release, CacheFull, pins,
evict-while-acquiring, reloads inside the thrash window, remembered footprints."""

from __future__ import annotations

import asyncio

import pytest

from earshot.cache.errors import CacheFull
from earshot.cache.events import Evicted, EvictionReason, Loaded, LoadStarted
from earshot.cache.lease import Lease
from earshot.cache.manager import ModelCache
from tests.support.fakes import FakeBackend, cache_harness, eventually, make_spec


async def _hold(cache: ModelCache, model: str, until: asyncio.Event, got: list[Lease]) -> None:
    async with cache.acquire(model) as lease:
        got.append(lease)
        await until.wait()


async def test_max_models_evicts_the_least_recently_used_idle_model() -> None:
    h = cache_harness(max_models=2, idle_timeout=-1)
    await h.cache.load("a")
    await h.cache.load("b")
    h.clock.advance(7)
    await h.cache.load("a")  # b is now the least recently used
    h.clock.advance(3)
    await h.cache.load("c")
    evicted = h.events.of(Evicted)
    assert [(e.model, e.reason) for e in evicted] == [("b", EvictionReason.CAPACITY)]
    assert evicted[0].idle_s == pytest.approx(10)
    assert evicted[0].resident_s == pytest.approx(10)
    assert h.loaded_ids() == ["c", "a"]
    # The victim's unload completed before the new load started.
    assert h.events.index(Evicted, "b") < h.events.index(LoadStarted, "c")
    assert h.backend.unloaded[0].model_id == "b"
    assert h.backend.started[-1] == "c"


async def test_memory_budget_evicts_lru_models_until_the_new_one_fits() -> None:
    backend = FakeBackend(footprints={"a": 200, "b": 200, "c": 150, "big": 450})
    h = cache_harness(["a", "b", "c", "big"], backend=backend, memory_budget_bytes=550, idle_timeout=-1)
    await h.cache.load("a")
    await h.cache.load("b")
    await h.cache.load("c")
    assert h.events.of(Evicted) == []  # 550 fits exactly
    await h.cache.load("a")  # order now: b, c, a
    await h.cache.load("big")  # 550 + 450 is 450 over: b (200), c (150), then a (200) must go
    evicted = [(e.model, e.reason) for e in h.events.of(Evicted)]
    assert evicted == [
        ("b", EvictionReason.MEMORY),
        ("c", EvictionReason.MEMORY),
        ("a", EvictionReason.MEMORY),
    ]
    assert h.loaded_ids() == ["big"]
    assert h.memory.total == 450


async def test_memory_budget_evicts_only_as_many_as_needed() -> None:
    backend = FakeBackend(footprints={"a": 200, "b": 200, "c": 250})
    h = cache_harness(["a", "b", "c"], backend=backend, memory_budget_bytes=500, idle_timeout=-1)
    await h.cache.load("a")
    await h.cache.load("b")
    await h.cache.load("c")
    assert [(e.model, e.reason) for e in h.events.of(Evicted)] == [("a", EvictionReason.MEMORY)]
    snapshot = h.cache.snapshot()
    assert sum(m.footprint_bytes for m in snapshot.models) == 450
    assert h.loaded_ids() == ["c", "b"]


async def test_a_model_larger_than_the_whole_budget_fails_at_once() -> None:
    backend = FakeBackend(footprints={"huge": 1000})
    h = cache_harness(["a", "huge"], backend=backend, memory_budget_bytes=500, idle_timeout=-1)
    await h.cache.load("a")
    with pytest.raises(
        CacheFull, match=r"estimated 1000 bytes, more than the whole memory budget \(500 bytes\)"
    ):
        await h.cache.load("huge")
    assert h.backend.load_calls["huge"] == 0
    assert h.events.of(LoadStarted, "huge") == []
    assert h.events.of(Evicted) == []  # nothing was evicted for a load that could never fit
    assert h.loaded_ids() == ["a"]


async def test_a_full_cache_waits_for_a_release_then_evicts() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=30)
    release_a = asyncio.Event()
    held: list[Lease] = []
    holder = asyncio.create_task(_hold(h.cache, "a", release_a, held))
    await eventually(lambda: len(held) == 1)
    waiter = asyncio.create_task(h.cache.load("b"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 1)
    h.clock.advance(29)  # still within load_timeout
    await asyncio.sleep(0.01)
    assert not waiter.done()
    state = h.cache.snapshot().get("b")
    assert state is not None
    assert state.loading
    assert state.waiting == 1
    assert h.backend.load_calls["b"] == 0
    release_a.set()
    await holder
    lease = await waiter
    assert lease.outcome == "miss"
    assert [(e.model, e.reason) for e in h.events.of(Evicted)] == [("a", EvictionReason.CAPACITY)]
    assert held[0].handle.unloaded
    assert h.loaded_ids() == ["b"]


async def test_cache_full_after_waiting_load_timeout_with_a_clear_message() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=30)
    release_a = asyncio.Event()
    held: list[Lease] = []
    holder = asyncio.create_task(_hold(h.cache, "a", release_a, held))
    await eventually(lambda: len(held) == 1)
    waiters = [asyncio.create_task(h.cache.load("b")) for _ in range(2)]
    await eventually(lambda: h.cache.snapshot().waiting_requests == 2)
    await eventually(lambda: h.clock.sleepers == 1, what="b's load to start waiting for room")
    h.clock.advance(30)
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, CacheFull) for r in results)
    assert str(results[0]).startswith("cache full: 1 models loaded, all in use; waited 30s")
    assert h.backend.load_calls["b"] == 0
    assert h.loaded_ids() == ["a"]
    assert h.cache.snapshot().waiting_requests == 0
    assert not held[0].handle.unloaded
    release_a.set()
    await holder


async def test_loads_in_progress_count_toward_max_models() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1)
    h.backend.block("a")
    loading_a = asyncio.create_task(h.cache.load("a"))
    await h.backend.wait_started("a")
    loading_b = asyncio.create_task(h.cache.load("b"))
    await asyncio.sleep(0.02)
    assert h.backend.load_calls["b"] == 0  # a's load in progress holds the only slot
    assert h.events.of(Evicted) == []
    h.backend.unblock("a")
    await loading_a
    await loading_b
    assert [(e.model, e.reason) for e in h.events.of(Evicted)] == [("a", EvictionReason.CAPACITY)]
    assert h.events.index(Loaded, "a") < h.events.index(Evicted, "a") < h.events.index(LoadStarted, "b")


async def test_pinned_models_go_for_capacity_only_when_no_unpinned_candidate_is_left() -> None:
    h = cache_harness([make_spec("p", pin=True), "a", "b", "c"], max_models=2, idle_timeout=-1)
    await h.cache.load("p")  # the least recently used, but pinned
    await h.cache.load("a")
    await h.cache.load("b")
    assert [e.model for e in h.events.of(Evicted)] == ["a"]
    await h.cache.load("c")
    assert [e.model for e in h.events.of(Evicted)] == ["a", "b"]
    assert sorted(h.loaded_ids()) == ["c", "p"]
    # Only pinned candidates idle: one goes rather than the cache being stuck.
    h2 = cache_harness([make_spec("p", pin=True), "c"], max_models=1, idle_timeout=-1)
    await h2.cache.load("p")
    await h2.cache.load("c")
    assert [(e.model, e.reason) for e in h2.events.of(Evicted)] == [("p", EvictionReason.CAPACITY)]


async def test_evict_while_acquiring_waits_for_the_unload_then_reloads() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, thrash_window=300)
    await h.cache.load("a")
    h.backend.block_unloads()
    release_b = asyncio.Event()
    got_b: list[Lease] = []
    b = asyncio.create_task(_hold(h.cache, "b", release_b, got_b))
    await eventually(lambda: h.backend.unloads_started == ["a"])  # b's load evicts a; a's unload hangs
    assert h.cache.snapshot().waiting_requests == 1
    assert h.loaded_ids() == ["a"]
    assert h.backend.unload_calls["a"] == 0
    # a is being unloaded (its unload blocked in the worker thread): a request for it waits.
    a = asyncio.create_task(h.cache.load("a"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 2)
    assert h.backend.load_calls["a"] == 1
    h.backend.unblock_unloads()
    await eventually(lambda: len(got_b) == 1)
    assert got_b[0].outcome == "miss"
    # a now waits for room: b is in use.
    await asyncio.sleep(0.02)
    assert not a.done()
    release_b.set()
    await b
    lease = await a
    assert lease.outcome == "miss"
    assert h.backend.load_calls["a"] == 2
    assert [(e.model, e.reason) for e in h.events.of(Evicted)] == [
        ("a", EvictionReason.CAPACITY),
        ("b", EvictionReason.CAPACITY),
    ]
    assert [s.reload for s in h.events.of(LoadStarted, "a")] == [False, True]
    assert got_b[0].handle.unloaded  # evicted for a, after its release


async def test_a_hit_just_before_room_is_made_protects_the_model() -> None:
    h = cache_harness(max_models=1, idle_timeout=-1, load_timeout=5)
    await h.cache.load("a")
    async with h.cache.acquire("a") as lease:
        task = asyncio.create_task(h.cache.load("b"))
        await eventually(lambda: h.cache.snapshot().waiting_requests == 1)
        assert h.events.of(Evicted) == []
        assert not lease.handle.unloaded
    assert (await task).outcome == "miss"
    assert [e.model for e in h.events.of(Evicted)] == ["a"]


async def test_reload_inside_and_outside_the_thrash_window() -> None:
    h = cache_harness(thrash_window=300, idle_timeout=-1)
    await h.cache.load("a")
    await h.cache.unload("a")
    h.clock.advance(299)
    await h.cache.load("a")
    assert [s.reload for s in h.events.of(LoadStarted, "a")] == [False, True]
    assert [x.reload for x in h.events.of(Loaded, "a")] == [False, True]
    await h.cache.unload("a")
    h.clock.advance(300)
    await h.cache.load("a")
    assert [s.reload for s in h.events.of(LoadStarted, "a")] == [False, True, False]
    assert [x.reload for x in h.events.of(Loaded, "a")] == [False, True, False]


async def test_measured_footprint_is_remembered_as_the_next_estimate() -> None:
    backend = FakeBackend(footprints={"a": 300}, estimates={"a": 100})
    h = cache_harness(["a", "b"], backend=backend, idle_timeout=-1)
    await h.cache.load("a")
    loaded = h.events.of(Loaded, "a")[0]
    assert (loaded.footprint_bytes, dict(loaded.footprint), loaded.measured) == (300, {"cpu": 300}, True)
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.footprint_bytes == 300
    assert state.footprint_measured
    await h.cache.unload("a")
    backend.block("a")
    task = asyncio.create_task(h.cache.load("a"))
    await backend.wait_started("a", count=2)
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.loading
    assert state.footprint_bytes == 300
    backend.unblock("a")
    await task


async def test_an_unusable_measurement_falls_back_to_the_estimate() -> None:
    backend = FakeBackend(footprints={"a": 300}, estimates={"a": 120}, track_memory=False)
    h = cache_harness(["a"], backend=backend)
    await h.cache.load("a")
    loaded = h.events.of(Loaded, "a")[0]
    assert (loaded.footprint_bytes, dict(loaded.footprint), loaded.measured) == (120, {}, False)
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.footprint_bytes == 120
    assert not state.footprint_measured


async def test_spec_size_bytes_is_the_estimate_when_the_backend_has_none() -> None:
    backend = FakeBackend(estimates={"a": 0}, track_memory=False)
    h = cache_harness([make_spec("a", size_bytes=4321)], backend=backend)
    await h.cache.load("a")
    assert h.events.of(Loaded, "a")[0].footprint_bytes == 4321


async def test_a_footprint_above_its_estimate_trims_idle_models_back_under_budget() -> None:
    backend = FakeBackend(footprints={"a": 100, "b": 450}, estimates={"b": 100})
    h = cache_harness(["a", "b"], backend=backend, memory_budget_bytes=500, idle_timeout=-1)
    await h.cache.load("a")
    await h.cache.load("b")  # fits by its estimate (200 <= 500), measures 450 (550 > 500)
    await eventually(lambda: bool(h.events.of(Evicted, "a")))
    assert h.events.of(Evicted, "a")[0].reason is EvictionReason.MEMORY
    assert h.loaded_ids() == ["b"]
