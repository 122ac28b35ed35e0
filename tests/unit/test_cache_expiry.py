"""earshot.cache.expiry on its own: the timeout in force, which entries are due, and the one
deadline task (rescheduled earlier, never later, woken by a FakeClock)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from earshot.cache.entry import EntryState, Table
from earshot.cache.expiry import IdleExpiry, due_entries, timeout_of
from tests.support.fakes import FakeClock, make_entry, make_spec


def test_timeout_of_prefers_keep_alive_then_the_spec_then_the_default() -> None:
    entry = make_entry("a", 1)
    assert timeout_of(entry, 300) == 300
    entry.spec = make_spec("a", idle_timeout=30)
    assert timeout_of(entry, 300) == 30
    entry.keep_alive = 0
    assert timeout_of(entry, 300) == 0
    entry.keep_alive = -1
    assert timeout_of(entry, 300) == -1


def test_due_entries_skips_the_busy_the_pinned_and_those_without_a_deadline() -> None:
    table = Table()
    due = make_entry("due", 1, table=table)
    due.deadline = 100.0
    later = make_entry("later", 1, table=table)
    later.deadline = 150.0
    busy = make_entry("busy", 1, table=table, refs=1)
    busy.deadline = 50.0  # stale: acquired again since
    pinned = make_entry("pinned", 1, table=table, pinned=True)
    pinned.deadline = 50.0
    make_entry("none", 1, table=table)
    loading = make_entry("loading", 1, table=table, state=EntryState.LOADING)
    loading.deadline = 50.0
    found, nearest = due_entries(table.values(), 100.0 - 1e-9)  # within the slack: due
    assert found == [due]
    assert nearest == 150.0
    found, nearest = due_entries(table.values(), 99.0)
    assert found == []
    assert nearest == 100.0


async def test_the_task_wakes_at_the_earliest_deadline_and_sleeps_again_for_the_next() -> None:
    clock = FakeClock(start=0.0)
    calls: list[float] = []
    pending = [150.0, None]
    tasks: list[asyncio.Task[None]] = []

    def expire(now: float) -> float | None:
        calls.append(now)
        return pending.pop(0)

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        tasks.append(asyncio.get_running_loop().create_task(coro))
        return tasks[-1]

    expiry = IdleExpiry(clock, expire, spawn)
    expiry.schedule(200.0)
    expiry.schedule(300.0)  # later: the task in place already wakes earlier
    assert expiry.next_at == 200.0
    assert len(tasks) == 1
    expiry.schedule(100.0)  # earlier: replaces the task
    assert expiry.next_at == 100.0
    assert len(tasks) == 2
    await asyncio.sleep(0)
    assert tasks[0].cancelled()
    clock.advance(99)
    await asyncio.sleep(0)
    assert calls == []
    clock.advance(1)
    for _ in range(3):
        await asyncio.sleep(0)
    assert calls == [100.0]
    assert expiry.next_at == 150.0  # rescheduled for the nearest deadline left
    clock.advance(50)
    for _ in range(3):
        await asyncio.sleep(0)
    assert calls == [100.0, 150.0]
    assert expiry.next_at is None
    expiry.schedule(500.0)
    expiry.cancel()
    assert expiry.next_at is None
    await asyncio.sleep(0)
    assert tasks[-1].cancelled()
