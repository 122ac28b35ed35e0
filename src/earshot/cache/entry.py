"""The cache's record of one model it holds (loading, loaded, or being unloaded).

Every field is read and written on the event loop only; worker threads get copies of what they
need (the backend, the spec, a box with the handle) and hand results back through futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from enum import Enum
from typing import Any

from earshot.cache.events import EvictionReason
from earshot.cache.lease import Lease
from earshot.cache.protocol import Backend, ModelSpec


class EntryState(Enum):
    LOADING = "loading"  # waiting for room, or backend.load running in a worker thread
    LOADED = "loaded"
    EVICTING = "evicting"  # backend.unload running; the memory still counts until it returns
    GONE = "gone"  # unloaded, or the load failed; no longer in the cache's table


class Entry:
    """One model in the cache. See `ModelCache` for the rules these fields implement.

    Reference accounting: `refs` counts leases held (`in_use`), `pending` counts requests waiting
    for this model's load (they are granted a reference the moment the load completes, with no
    await in between, so nothing can evict the model under them). A model is evictable only while
    it is LOADED with `refs == 0` and `pending == 0`.
    """

    __slots__ = (
        "admitted",
        "backend",
        "created_wall",
        "deadline",
        "evicted",
        "footprint",
        "footprint_bytes",
        "handle",
        "idle_since",
        "keep_alive",
        "last_used_wall",
        "lease",
        "load_done",
        "load_started",
        "loaded_at",
        "loaded_wall",
        "measured",
        "out_of_memory",
        "pending",
        "pinned",
        "refs",
        "reload",
        "spec",
        "state",
        "task",
        "unload_reason",
    )

    def __init__(
        self,
        spec: ModelSpec,
        backend: Backend,
        *,
        pinned: bool,
        wall: float,
        load_done: asyncio.Future[None],
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.state = EntryState.LOADING
        self.admitted = False  # counts toward max_models / the memory budget (room was made for it)
        self.handle: Any = None
        self.lease: Lease | None = None  # the Lease every hit yields (built once per load)
        self.refs = 0
        self.pending = 0
        self.keep_alive: float | None = None  # the latest request's override
        self.pinned = pinned
        self.unload_reason: EvictionReason | None = None  # unload scheduled for the last release
        self.created_wall = wall
        self.load_started: float | None = None  # monotonic: LoadStarted was published
        self.loaded_at: float | None = None  # monotonic
        self.loaded_wall: float | None = None
        self.last_used_wall = wall
        self.idle_since: float | None = None  # monotonic: the last reference went
        self.deadline: float | None = None  # monotonic: idle expiry, None while none applies
        self.footprint: Mapping[str, int] = {}
        self.footprint_bytes = 0  # the estimate until the load measured it
        self.measured = False
        self.reload = False
        self.out_of_memory = False
        self.load_done = load_done  # result None when loaded; a CacheError when the load failed
        self.task: asyncio.Task[None] | None = None  # the load task
        self.evicted: asyncio.Task[None] | None = None  # the eviction task, once started

    @property
    def idle(self) -> bool:
        """Loaded and nobody holds or waits for it: a candidate for eviction."""
        return self.state is EntryState.LOADED and self.refs == 0 and self.pending == 0
