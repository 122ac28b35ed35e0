"""Admission: room for a new load under `max_models` and the memory budget, served in order.

Room counts every admitted model: loads in progress, loaded models, and models being unloaded
(their memory is not back yet). A load plans room with `plan_room`: evict least recently used idle
models (reason `capacity` while the count is over, `memory` while only bytes are), wait for those
unloads to complete, plan again; when no plan exists (everything else in use or loading) it waits
for a change (a release, an unload, a load ending) up to `load_timeout`, then fails with `CacheFull`.

Fairness: loads that wait for room queue first come, first served: only the head of the queue
plans, so a load arriving later cannot take the room an earlier one waited for (a small load
behind a large one waits too: fairness before packing). While the head waits, the loaded models
it needs evicted (`blockers`: the victims if every loaded model were idle) are *held for it*: new
requests for them queue behind it instead of hitting, so a model in steady use becomes idle once
the requests already in flight finish. The hold ends when the head is admitted or gives up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from earshot.cache.entry import Entry, EntryState, Table
from earshot.cache.errors import CacheError, CacheFull
from earshot.cache.events import EvictionReason
from earshot.cache.planning import blockers, plan_room
from earshot.cache.protocol import Clock
from earshot.cache.state import CacheConfig
from earshot.cache.timing import Signal

Evict = Callable[[Entry, EvictionReason], "asyncio.Task[None]"]


class Admission:
    """Makes room for loads, in arrival order; trims back under budget; evicts idle on out-of-memory.

    `evict(entry, reason)` starts an eviction (the cache's), `closing()` tells whether the cache
    shuts down and `closed_error(model_id)` is what a waiting load raises then.
    """

    def __init__(
        self,
        table: Table,
        config: CacheConfig,
        clock: Clock,
        changed: Signal,
        evict: Evict,
        closing: Callable[[], bool],
        closed_error: Callable[[str], CacheError],
    ) -> None:
        self._table = table
        self._config = config
        self._clock = clock
        self._changed = changed
        self._evict = evict
        self._closing = closing
        self._closed_error = closed_error
        self._queue: list[Entry] = []  # loads waiting for room, first come first
        self.held: frozenset[str] = frozenset()  # ids whose new requests queue behind the head

    @property
    def queue(self) -> tuple[Entry, ...]:
        return tuple(self._queue)

    async def admit(self, entry: Entry) -> None:
        """Wait for room for `entry` (ADMITTING), then move it to LOADING: it counts from then on."""
        config = self._config
        deadline: float | None = None
        timed_out = False
        self._queue.append(entry)
        try:
            while True:
                # Re-plan after every await: releases, other loads and unloads change the picture.
                if self._closing():
                    raise self._closed_error(entry.spec.id)
                if self._queue[0] is entry:
                    plan = plan_room(
                        self._table.values(),
                        entry,
                        max_models=config.max_models,
                        budget=config.memory_budget_bytes,
                    )
                    if plan is not None and not plan:
                        entry.to(EntryState.LOADING)  # no await since the plan: the room is its own
                        return
                    if plan:
                        unloads = [self._evict(victim, reason) for victim, reason in plan]
                        self._hold_for_head()
                        await asyncio.wait(unloads)  # the memory is back before the load starts
                        continue
                    self._hold_for_head()
                if timed_out:
                    raise CacheFull(self.full_message(entry), model=entry.spec.id)
                if deadline is None:
                    deadline = self._clock.monotonic() + config.load_timeout
                timed_out = not await self._changed.wait(self._clock, deadline)
        finally:
            self.withdraw(entry)

    def withdraw(self, entry: Entry) -> None:
        """`entry` no longer waits for room (admitted, failed, abandoned): the next in line plans."""
        if entry in self._queue:
            self._queue.remove(entry)
            self._hold_for_head()
            self._changed.notify()

    def _hold_for_head(self) -> None:
        head = self._queue[0] if self._queue else None
        held: frozenset[str] = frozenset()
        if head is not None:
            config = self._config
            found = blockers(
                self._table.values(), head, max_models=config.max_models, budget=config.memory_budget_bytes
            )
            held = frozenset(e.spec.id for e in found)
        if held != self.held:
            self.held = held
            self._changed.notify()  # requests queued behind a hold that ended go on

    def full_message(self, entry: Entry) -> str:
        config = self._config
        held = sum(1 for e in self._table.values() if e.admitted)
        ahead = self._queue.index(entry) if entry in self._queue else 0
        behind = f", behind {ahead} earlier loads waiting for room" if ahead else ""
        return (
            f"cache full: {held} models loaded, all in use; waited {config.load_timeout:g}s for one to be "
            f"released to load {entry.spec.id} (max_models={config.max_models}, "
            f"memory_budget_bytes={config.memory_budget_bytes}){behind}"
        )

    def trim_to_budget(self) -> None:
        """A measured footprint above its estimate can push the total over budget: evict idle LRU."""
        budget = self._config.memory_budget_bytes
        if budget is None:
            return
        plan = plan_room(self._table.values(), None, max_models=None, budget=budget)
        for victim, reason in plan or ():
            self._evict(victim, reason)

    async def evict_idle_for(self, entry: Entry) -> None:
        """Out of memory: unload every idle model (unpinned ones; pinned only if there is no other),
        and wait for those and the unloads already under way."""
        idle = [e for e in self._table.values() if e.idle and e is not entry]
        victims = [e for e in idle if not e.pinned] or idle
        unloads = {self._evict(e, EvictionReason.MEMORY) for e in victims}
        unloads |= {
            e.evicted
            for e in self._table.values()
            if e.state is EntryState.EVICTING and e.evicted is not None
        }
        if unloads:
            await asyncio.wait(unloads)
