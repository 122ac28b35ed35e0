"""Which models to evict so that one more fits: a pure function of the cache's table."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from earshot.cache.entry import Entry, EntryState
from earshot.cache.events import EvictionReason

Plan = list[tuple[Entry, EvictionReason]]


def _is_idle(entry: Entry) -> bool:
    return entry.idle


def _is_loaded(entry: Entry) -> bool:
    return entry.state is EntryState.LOADED


def plan_room(
    entries: Iterable[Entry],
    new: Entry | None,
    *,
    max_models: int | None,
    budget: int | None,
    evictable: Callable[[Entry], bool] = _is_idle,
) -> Plan | None:
    """Plan room for `new` (or, with `new=None`, for getting back under the limits).

    `entries` is the cache's table in LRU order (least recently used first). What occupies room:
    every admitted entry (loads in progress, loaded models, and models being unloaded, whose memory
    is not back yet). Returns:

    - `[]`: it fits now;
    - a non-empty list of (victim, reason): evict these, then plan again. Victims are idle models,
      least recently used first, unpinned ones before pinned ones (pinned models go only when no
      unpinned candidate is left). The reason is `capacity` while the count is over `max_models`,
      `memory` while only the bytes are over the budget;
    - `None`: no room can be made now (everything else is in use or loading), or unloads already
      under way will make it: wait for a change and plan again.

    `evictable` says which entries may be victims (default: idle ones); `blockers` asks it of
    every loaded model.
    """
    occupied = [e for e in entries if e.admitted and e is not new]
    count = len(occupied) + (1 if new is not None else 0)
    total = sum(e.footprint_bytes for e in occupied) + (new.footprint_bytes if new is not None else 0)
    count_over = count - max_models if max_models is not None else 0
    bytes_over = total - budget if budget is not None else 0
    if count_over <= 0 and bytes_over <= 0:
        return []
    leaving = [e for e in occupied if e.state is EntryState.EVICTING]
    count_over -= len(leaving)
    bytes_over -= sum(e.footprint_bytes for e in leaving)
    if count_over <= 0 and bytes_over <= 0:
        return None  # the unloads under way make room: wait for them rather than evict more
    idle = [e for e in occupied if e.state is EntryState.LOADED and evictable(e)]
    candidates = [e for e in idle if not e.pinned] + [e for e in idle if e.pinned]
    plan: Plan = []
    for victim in candidates:
        if count_over <= 0 and bytes_over <= 0:
            break
        plan.append((victim, EvictionReason.CAPACITY if count_over > 0 else EvictionReason.MEMORY))
        count_over -= 1
        bytes_over -= victim.footprint_bytes
    if count_over > 0 or bytes_over > 0:
        return None
    return plan


def blockers(
    entries: Iterable[Entry], new: Entry, *, max_models: int | None, budget: int | None
) -> list[Entry]:
    """The loaded models that stand between `new` and room: the victims a plan would pick if every
    loaded model were idle. Empty when unloads under way suffice or no eviction could make room
    (only loads in progress are in the way)."""
    plan = plan_room(entries, new, max_models=max_models, budget=budget, evictable=_is_loaded)
    return [victim for victim, _ in plan or ()]
