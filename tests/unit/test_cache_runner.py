"""Blocking work on the cache's own runner, and requests waiting outside the cache counted
(issue 12 point 5, the cache's part)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from earshot.cache.errors import CacheBusy
from earshot.cache.runner import THREAD_PREFIX
from tests.support.fakes import LOOP_EXECUTOR, FakeBackend, cache_harness, eventually

T = TypeVar("T")


class RecordingRunner:
    """A BlockingRunner that records the name of every function it runs (in a thread of its own)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="recording")

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        self.calls.append(getattr(fn, "__name__", repr(fn)))
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


async def _saturate_default_pool() -> tuple[threading.Event, list[asyncio.Future[bool]]]:
    """Give the loop a 2-thread default executor and occupy both threads (like long inference streams)."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2, thread_name_prefix="default"))
    stop = threading.Event()
    streams = [loop.run_in_executor(None, stop.wait, 30) for _ in range(2)]
    return stop, streams


async def test_a_load_completes_while_the_default_pool_is_saturated() -> None:
    stop, streams = await _saturate_default_pool()
    h = cache_harness(runner=None, idle_timeout=-1)  # the cache's default: its own pool
    try:
        lease = await asyncio.wait_for(h.cache.load("a"), timeout=10)
        assert lease.outcome == "miss"
        assert await asyncio.wait_for(h.cache.unload("a"), timeout=10) == "unloaded"
        names = {name for _, name in h.backend.threads}
        assert names
        assert all(name.startswith(THREAD_PREFIX) for name in names), names
        assert {method for method, _ in h.backend.threads} == {"footprint", "load", "unload"}
    finally:
        stop.set()
        await asyncio.gather(*streams)
        await h.cache.close()


async def test_on_the_shared_default_pool_the_same_load_starves() -> None:
    """The control: what the cache did before (loads on the loop's default executor)."""
    stop, streams = await _saturate_default_pool()
    h = cache_harness(runner=LOOP_EXECUTOR)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(h.cache.load("a")), timeout=0.3)
    finally:
        stop.set()
        await asyncio.gather(*streams)
        await eventually(lambda: h.loaded_ids() == ["a"])
        await h.cache.close()


async def test_close_shuts_the_own_pool_down() -> None:
    before = set(threading.enumerate())  # a pool another test left open is not this cache's

    def own_pool_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t not in before]

    h = cache_harness(runner=None)
    await h.cache.load("a")
    assert own_pool_threads()
    await h.cache.close()
    await eventually(lambda: not own_pool_threads(), what="the cache's earshot-load threads to exit")


async def test_an_injected_runner_runs_every_blocking_call() -> None:
    runner = RecordingRunner()
    backend = FakeBackend()
    h = cache_harness(backend=backend, runner=runner, idle_timeout=-1, load_timeout=5)
    try:
        await h.cache.load("a")
        await h.cache.unload("a")
        assert runner.calls == ["estimate_footprint", "load_measured", "unload_released"]
        assert all(name.startswith("recording") for _, name in backend.threads)
        # A late load (past its timeout) is unloaded on the runner too.
        backend.block("b")
        late = asyncio.create_task(h.cache.load("b"))
        await backend.wait_started("b")
        h.clock.advance(5)
        with pytest.raises(Exception, match="model_load_timeout"):
            await late
        backend.unblock("b")
        await eventually(lambda: backend.unload_calls["b"] == 1)
        assert runner.calls[-1] == "unload_released"
    finally:
        await h.cache.close()
        runner.pool.shutdown()


async def test_requests_waiting_outside_count_and_the_next_one_is_refused_at_once() -> None:
    h = cache_harness(max_waiting=3, idle_timeout=-1)
    await h.cache.load("a")
    with h.cache.waiting("a"), h.cache.waiting("a"), h.cache.waiting("a"):
        snapshot = h.cache.snapshot()
        assert snapshot.waiting_requests == 3
        state = snapshot.get("a")
        assert state is not None
        assert state.waiting == 3
        with pytest.raises(CacheBusy, match="max_waiting_requests=3"), h.cache.waiting("a"):
            pass  # pragma: no cover - never entered
        with pytest.raises(CacheBusy):  # and a request that would wait in the cache, too
            await h.cache.load("b")
        assert (await h.cache.load("a")).outcome == "hit"  # hits never wait
        assert h.cache.snapshot().waiting_requests == 3
    assert h.cache.snapshot().waiting_requests == 0
    assert h.cache.snapshot().get("a").waiting == 0  # type: ignore[union-attr]


async def test_an_exception_inside_waiting_still_leaves_the_count() -> None:
    h = cache_harness(max_waiting=1)
    with pytest.raises(RuntimeError), h.cache.waiting("a"):
        raise RuntimeError("the inference slot wait failed")
    assert h.cache.snapshot().waiting_requests == 0
    with h.cache.waiting("a"):
        assert h.cache.snapshot().waiting_requests == 1
