"""Waiting on the cache's own clock, so that tests can drive every timeout with a fake one."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from earshot.cache.protocol import Clock

T = TypeVar("T")


class Expired(Exception):
    """A wait on the clock ran out (distinct from any TimeoutError a backend may raise)."""


async def wait_until(fut: asyncio.Future[T], clock: Clock, deadline: float) -> T:
    """The result of `fut`, waiting until the monotonic `deadline` of `clock` at most.

    Raises `Expired` when the deadline passes first; re-raises `fut`'s exception. Never cancels
    `fut` (not on expiry, not when the waiting task is cancelled): the caller decides what happens
    to work that outlives the wait.
    """
    if not fut.done():
        if deadline - clock.monotonic() <= 0:
            raise Expired
        sleeper = asyncio.ensure_future(_sleep_until(clock, deadline))
        try:
            await asyncio.wait((fut, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if not fut.done():
            raise Expired
    return fut.result()


async def _sleep_until(clock: Clock, deadline: float) -> None:
    # The remaining time is read when the sleep starts (a loop iteration after it was scheduled),
    # so a clock that jumped in between (a test's fake clock) still wakes it at `deadline`.
    await clock.sleep(deadline - clock.monotonic())


class Signal:
    """Wakes every waiter at once whenever something changed (a release, an unload, a load ending).

    Waiters then re-check their own condition. `notify()` costs one attribute test when nobody
    waits, so it can sit on the hit path.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def wait(self, clock: Clock, deadline: float | None) -> bool:
        """Wait for the next `notify()`; False if the monotonic `deadline` (None: none) came first."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            if deadline is None:
                await fut
            else:
                await wait_until(fut, clock, deadline)
        except Expired:
            return False
        finally:
            if not fut.done():
                fut.cancel()
            if fut in self._waiters:  # expired or cancelled: not woken, so still listed
                self._waiters.remove(fut)
        return True
