"""Failed loads: N waiters all get the error, nothing stays, the next request retries; timeouts
(the late handle is unloaded, not leaked); out of memory (evict idle and retry once)."""

from __future__ import annotations

import asyncio

import pytest

from earshot.cache.errors import ModelLoadError, ModelLoadTimeout
from earshot.cache.events import Evicted, EvictionReason, Loaded, LoadFailed, LoadFailureKind, LoadStarted
from earshot.cache.lease import Lease
from earshot.cache.manager import ModelCache
from tests.support.fakes import cache_harness, eventually, make_spec


async def _request(cache: ModelCache, model: str) -> Lease:
    async with cache.acquire(model) as lease:
        return lease


async def test_failed_load_fails_every_waiter_and_the_next_request_retries() -> None:
    h = cache_harness()
    h.backend.block("a")
    h.backend.fail_next("a")
    tasks = [asyncio.create_task(_request(h.cache, "a")) for _ in range(5)]
    await h.backend.wait_started("a")
    await eventually(lambda: h.cache.snapshot().waiting_requests == 5)
    h.backend.unblock("a")
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ModelLoadError) and not isinstance(r, ModelLoadTimeout) for r in results)
    assert all("fake load failure" in str(r) for r in results)
    assert len({id(r) for r in results}) == 5  # each request raises its own exception object
    assert h.backend.load_calls["a"] == 1
    failed = h.events.of(LoadFailed, "a")
    assert len(failed) == 1
    assert failed[0].error_kind is LoadFailureKind.FAILURE
    assert failed[0].out_of_memory is False
    # Nothing half-loaded stays behind.
    assert h.cache.snapshot().models == ()
    assert h.cache.snapshot().waiting_requests == 0
    assert h.backend.live == []
    # The next request retries, and succeeds.
    async with h.cache.acquire("a") as lease:
        assert lease.outcome == "miss"
    assert h.backend.load_calls["a"] == 2
    assert len(h.events.of(Loaded, "a")) == 1


async def test_failed_load_frees_its_room_for_others() -> None:
    h = cache_harness(max_models=1, memory_budget_bytes=100)
    h.backend.fail_next("a")
    with pytest.raises(ModelLoadError):
        await h.cache.load("a")
    async with asyncio.timeout(5):
        assert (await h.cache.load("b")).outcome == "miss"
    assert h.events.of(Evicted) == []


async def test_timeout_fails_the_waiters_and_the_late_handle_is_unloaded() -> None:
    h = cache_harness(load_timeout=10)
    h.backend.block("a")
    tasks = [asyncio.create_task(_request(h.cache, "a")) for _ in range(3)]
    await h.backend.wait_started("a")
    h.clock.advance(9.9)
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    h.clock.advance(0.2)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ModelLoadTimeout) for r in results)
    assert "longer than model_load_timeout (10s)" in str(results[0])
    failed = h.events.of(LoadFailed, "a")
    assert [f.error_kind for f in failed] == [LoadFailureKind.TIMEOUT]
    assert failed[0].duration_s == pytest.approx(10.1)
    assert h.cache.snapshot().models == ()
    # The load completes later in its thread: its handle is unloaded, not leaked.
    h.backend.unblock("a")
    await eventually(lambda: h.backend.unloads == 1, what="the late handle to be unloaded")
    assert h.backend.live == []
    assert h.backend.unloaded[0].model_id == "a"
    assert h.memory.total == 0
    assert h.events.of(Evicted) == []  # it was never in the cache
    # And the next request retries.
    assert (await h.cache.load("a")).outcome == "miss"
    assert h.backend.load_calls["a"] == 2


async def test_a_late_load_that_fails_leaves_nothing_to_unload() -> None:
    h = cache_harness(load_timeout=1)
    h.backend.block("a")
    h.backend.fail_next("a")
    task = asyncio.create_task(h.cache.load("a"))
    await h.backend.wait_started("a")
    h.clock.advance(2)
    with pytest.raises(ModelLoadTimeout):
        await task
    h.backend.unblock("a")
    await asyncio.sleep(0.05)
    assert h.backend.unloads == 0
    assert h.backend.live == []


async def test_out_of_memory_evicts_idle_models_and_retries_once() -> None:
    h = cache_harness(idle_timeout=-1)
    await h.cache.load("a")
    await h.cache.load("b")
    h.backend.oom_next("c")
    async with h.cache.acquire("d"):  # in use: must survive the OOM eviction
        async with h.cache.acquire("c") as lease:
            assert lease.outcome == "miss"
        evicted = h.events.of(Evicted)
        assert sorted(e.model for e in evicted) == ["a", "b"]
        assert {e.reason for e in evicted} == {EvictionReason.MEMORY}
        assert h.loaded_ids() == ["c", "d"]
    assert h.backend.load_calls["c"] == 2
    assert h.events.of(LoadFailed) == []
    assert len(h.events.of(LoadStarted, "c")) == 1  # one load, two attempts
    assert len(h.events.of(Loaded, "c")) == 1


async def test_out_of_memory_twice_fails_with_out_of_memory_flag() -> None:
    h = cache_harness(idle_timeout=-1)
    await h.cache.load("a")
    h.backend.oom_next("c", times=2)
    with pytest.raises(ModelLoadError, match="out of memory"):
        await h.cache.load("c")
    failed = h.events.of(LoadFailed, "c")
    assert len(failed) == 1
    assert failed[0].out_of_memory is True
    assert failed[0].error_kind is LoadFailureKind.FAILURE
    assert h.backend.load_calls["c"] == 2
    assert [e.model for e in h.events.of(Evicted)] == ["a"]
    assert h.cache.snapshot().models == ()
    # Not sticky: the next load of c works.
    assert (await h.cache.load("c")).outcome == "miss"


async def test_out_of_memory_spares_pinned_models_when_unpinned_ones_are_idle() -> None:
    h = cache_harness([make_spec("p", pin=True), "a", "c"], idle_timeout=-1)
    await h.cache.load("p")
    await h.cache.load("a")
    h.backend.oom_next("c")
    await h.cache.load("c")
    assert [e.model for e in h.events.of(Evicted)] == ["a"]
    assert set(h.loaded_ids()) == {"p", "c"}


async def test_a_cancelled_requester_does_not_cancel_the_shared_load() -> None:
    h = cache_harness(idle_timeout=60)
    h.backend.block("a")
    first = asyncio.create_task(_request(h.cache, "a"))
    await h.backend.wait_started("a")
    second = asyncio.create_task(_request(h.cache, "a"))
    await eventually(lambda: h.cache.snapshot().waiting_requests == 2)
    first.cancel()
    await asyncio.sleep(0)
    assert h.cache.snapshot().waiting_requests == 1
    h.backend.unblock("a")
    lease = await second
    assert lease.outcome == "coalesced"
    assert h.backend.load_calls["a"] == 1
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.loaded
    assert state.in_use == 0


async def test_a_load_whose_requesters_all_gave_up_becomes_idle_with_its_timer() -> None:
    h = cache_harness(idle_timeout=60)
    h.backend.block("a")
    task = asyncio.create_task(_request(h.cache, "a"))
    await h.backend.wait_started("a")
    task.cancel()
    h.backend.unblock("a")
    await eventually(lambda: bool(h.events.of(Loaded, "a")))
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.in_use == 0
    assert state.idle_seconds == 0
    assert state.expires_at == pytest.approx(h.clock.wall() + 60)
    h.clock.advance(61)
    await eventually(lambda: bool(h.events.of(Evicted, "a")))
    assert h.events.of(Evicted, "a")[0].reason is EvictionReason.IDLE
