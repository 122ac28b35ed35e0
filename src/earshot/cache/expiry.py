"""Idle expiry: which idle models are due, and the one task that sleeps until the next is.

The timeout in force is the latest request's `keep_alive`, else `spec.idle_timeout`, else the
cache's `idle_timeout`: -1 (any negative) never expires, 0 unloads when the last reference goes,
N seconds after it. Expiry is by deadline, with no periodic scan: `IdleExpiry` keeps one task
asleep on the cache's clock until the earliest deadline. A deadline earlier than the scheduled
wake-up replaces that task; one that goes away (the model is acquired again) or moves later
leaves it, and the early wake-up just finds nothing due and sleeps again until the next deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from earshot.cache.entry import Entry
from earshot.cache.protocol import Clock

# An idle deadline this close to now counts as reached: a clock's sleep may end a hair early
# (asyncio rounds to its clock resolution; float sums differ in the last bit).
DEADLINE_SLACK = 1e-6


def timeout_of(entry: Entry, default: float) -> float:
    """The idle timeout in force for `entry` (its latest keep_alive, its spec's, else `default`)."""
    if entry.keep_alive is not None:
        return entry.keep_alive
    if entry.spec.idle_timeout is not None:
        return entry.spec.idle_timeout
    return default


def due_entries(entries: Iterable[Entry], now: float) -> tuple[list[Entry], float | None]:
    """The idle, unpinned entries whose deadline is reached at `now`, and the nearest deadline left."""
    due: list[Entry] = []
    nearest: float | None = None
    for entry in entries:
        deadline = entry.deadline
        if deadline is None or entry.pinned or not entry.idle:
            continue
        if deadline <= now + DEADLINE_SLACK:
            due.append(entry)
        elif nearest is None or deadline < nearest:
            nearest = deadline
    return due, nearest


class IdleExpiry:
    """Sleeps until the earliest scheduled deadline, then calls `expire(now)`.

    `expire` evicts what is due and returns the nearest deadline still pending (or None); the
    task then sleeps again until it. `spawn` starts the task (the cache runs it detached from any
    request's context).
    """

    __slots__ = ("_clock", "_expire", "_spawn", "_wakeup")

    def __init__(
        self,
        clock: Clock,
        expire: Callable[[float], float | None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self._clock = clock
        self._expire = expire
        self._spawn = spawn
        self._wakeup: tuple[float, asyncio.Task[None]] | None = None  # (deadline, the task asleep until it)

    @property
    def next_at(self) -> float | None:
        """The monotonic deadline the task wakes up at, None when none is scheduled."""
        return None if self._wakeup is None else self._wakeup[0]

    def schedule(self, deadline: float) -> None:
        """Make sure the task wakes up no later than `deadline`."""
        wakeup = self._wakeup
        if wakeup is not None:
            if wakeup[0] <= deadline:
                return
            wakeup[1].cancel()  # it only ever awaits its sleep: cancelling it is safe
        self._wakeup = (deadline, self._spawn(self._run(deadline)))

    def cancel(self) -> None:
        if self._wakeup is not None:
            self._wakeup[1].cancel()
            self._wakeup = None

    async def _run(self, deadline: float) -> None:
        clock = self._clock
        await clock.sleep(deadline - clock.monotonic())
        # Nothing below awaits: a cancel can only land in the sleep above.
        self._wakeup = None
        nearest = self._expire(clock.monotonic())
        if nearest is not None:
            self.schedule(nearest)
