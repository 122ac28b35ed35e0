"""`Workers.run_load`: each load in a thread of its own that has ended when the load returns
(CTranslate2's libgomp thread team of the loading thread goes with it; see `run_in_own_thread`)."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from earshot.inference.workers import LOAD_THREAD_NAME, Workers

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def _where() -> threading.Thread:
    return threading.current_thread()


async def test_each_load_runs_in_a_new_thread_that_has_ended_when_it_returns() -> None:
    workers = Workers(1)
    first = await workers.run_load(_where)
    second = await workers.run_load(_where)
    assert first is not threading.main_thread()
    assert first is not second
    assert first.name.startswith(LOAD_THREAD_NAME)
    assert not first.is_alive()  # ended before run_load returned
    assert not second.is_alive()


async def test_a_load_sees_the_callers_context_and_raises_its_errors() -> None:
    workers = Workers(1)
    request_id.set("r-1")
    assert await workers.run_load(request_id.get) == "r-1"

    def broken() -> None:
        raise ValueError("no such file")

    with pytest.raises(ValueError, match="no such file"):
        await workers.run_load(broken)


async def test_loads_run_at_most_load_threads_at_once() -> None:
    workers = Workers(1, load_threads=2)
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def load() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(10)
        with lock:
            running -= 1

    tasks = [asyncio.ensure_future(workers.run_load(load)) for _ in range(3)]
    for _ in range(100):
        await asyncio.sleep(0.01)
        if running == 2:
            break
    await asyncio.sleep(0.05)
    assert running == 2
    release.set()
    await asyncio.gather(*tasks)
    assert most == 2


async def test_a_cancelled_caller_waits_for_its_load_to_finish() -> None:
    workers = Workers(1)
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def load() -> None:
        started.set()
        release.wait(10)
        finished.set()

    task = asyncio.ensure_future(workers.run_load(load))
    while not started.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting: the thread uses what the caller holds
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()
