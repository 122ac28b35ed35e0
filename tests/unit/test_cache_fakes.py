"""The fakes other tests rely on behave as documented."""

from __future__ import annotations

import asyncio

import pytest

from earshot.cache.protocol import BackendOutOfMemory, Clock
from tests.support.fakes import FakeBackend, FakeClock, FakeLoadError, InlineExecutor, make_spec


def test_fake_clock_is_a_clock() -> None:
    clock: Clock = FakeClock(start=10.0, wall_start=1000.0)
    assert (clock.monotonic(), clock.wall()) == (10.0, 1000.0)


async def test_fake_clock_wakes_due_sleepers_only() -> None:
    clock = FakeClock()
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(seconds)

    tasks = [asyncio.create_task(sleeper(s)) for s in (30, 10, 20)]
    await asyncio.sleep(0)
    assert clock.sleepers == 3
    assert clock.next_wakeup() == clock.monotonic() + 10
    clock.advance(15)
    await asyncio.sleep(0)
    assert woke == [10]
    clock.advance(15)
    await asyncio.gather(*tasks)
    assert woke == [10, 20, 30]
    assert clock.monotonic() == 1030.0
    assert clock.wall() == 1_700_000_030.0
    assert clock.sleepers == 0
    assert clock.next_wakeup() is None


async def test_fake_clock_cancelled_sleep_and_zero_sleep() -> None:
    clock = FakeClock()
    task = asyncio.create_task(clock.sleep(5))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    assert clock.sleepers == 0
    clock.advance(10)  # skips the cancelled one without error
    await clock.sleep(0)
    await clock.sleep(-1)
    with pytest.raises(ValueError, match="back"):
        clock.advance(-1)


async def test_fake_clock_advance_from_another_thread() -> None:
    clock = FakeClock()
    task = asyncio.create_task(clock.sleep(1))
    await asyncio.sleep(0)
    await asyncio.to_thread(clock.advance, 1)
    await asyncio.wait_for(task, 1)


def test_fake_backend_failures_are_per_model_and_counted() -> None:
    backend = FakeBackend(footprints={"a": 10})
    backend.fail_next("a")
    backend.oom_next()
    with pytest.raises(FakeLoadError):
        backend.load(make_spec("a"))
    with pytest.raises(BackendOutOfMemory):
        backend.load(make_spec("b"))
    handle = backend.load(make_spec("a"))
    assert backend.load_calls == {"a": 2, "b": 1}
    assert backend.loads == 1
    assert backend.memory() == {"cpu": 10}
    backend.unload(handle)
    assert handle.unloaded
    assert backend.unloaded == [handle]
    assert backend.memory.total == 0
    with pytest.raises(AssertionError, match="twice"):
        backend.unload(handle)


async def test_fake_backend_block_and_unblock() -> None:
    backend = FakeBackend()
    backend.block("a")
    task = asyncio.create_task(asyncio.to_thread(backend.load, make_spec("a")))
    await backend.wait_started("a")
    await asyncio.sleep(0.01)
    assert not task.done()
    backend.unblock("a")
    handle = await task
    assert handle.model_id == "a"
    assert backend.live == [handle]


async def test_inline_executor_runs_jobs_in_the_calling_thread() -> None:
    loop = asyncio.get_running_loop()
    executor = InlineExecutor()
    assert await loop.run_in_executor(executor, lambda: 41 + 1) == 42
    with pytest.raises(ZeroDivisionError):
        await loop.run_in_executor(executor, lambda: 1 / 0)
