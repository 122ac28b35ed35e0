"""The cache's record of one model it holds, its state machine, and the table of live records.

Every field is read and written on the event loop only; worker threads get copies of what they
need (the backend, the spec, a box with the handle) and hand results back through futures.

States and their only transitions (anything else raises `IllegalTransition`):

    DOWNLOADING -> ADMITTING -> LOADING -> LOADED -> EVICTING -> GONE
         |             |           |
         +-> FAILED <--+-----------+        (DOWNLOADING, ADMITTING) -> GONE: abandoned

An entry is in its `Table` exactly while its state is live (not GONE or FAILED): the terminal
transitions take it out, so the table and the states cannot disagree. Facts that follow from
others are properties, not fields: `admitted` (from the state), `pinned` (the table's pins, else
the spec), `footprint_bytes` and `measured` (the measured footprint, else the table's estimate),
`handle` (from the lease).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any

from earshot.cache.events import EvictionReason
from earshot.cache.footprint import Footprints
from earshot.cache.lease import Lease
from earshot.cache.protocol import Backend, ModelSpec


class EntryState(Enum):
    DOWNLOADING = "downloading"  # backend.fetch running: the files `load` needs are being fetched
    ADMITTING = "admitting"  # footprint estimate, then waiting for room; counts toward no limit yet
    LOADING = "loading"  # admitted (counts toward the limits); backend.load running in a worker
    LOADED = "loaded"
    EVICTING = "evicting"  # backend.unload running; the memory still counts until it returns
    GONE = "gone"  # unloaded, or abandoned before its load started (nobody waited for it any more)
    FAILED = "failed"  # the download or load failed, or was cut short by shutdown


LIVE = frozenset(
    {EntryState.DOWNLOADING, EntryState.ADMITTING, EntryState.LOADING, EntryState.LOADED, EntryState.EVICTING}
)
LOADING_STATES = frozenset({EntryState.DOWNLOADING, EntryState.ADMITTING, EntryState.LOADING})
ADMITTED_STATES = frozenset({EntryState.LOADING, EntryState.LOADED, EntryState.EVICTING})

TRANSITIONS: Mapping[EntryState, frozenset[EntryState]] = {
    EntryState.DOWNLOADING: frozenset({EntryState.ADMITTING, EntryState.FAILED, EntryState.GONE}),
    EntryState.ADMITTING: frozenset({EntryState.LOADING, EntryState.FAILED, EntryState.GONE}),
    EntryState.LOADING: frozenset({EntryState.LOADED, EntryState.FAILED}),
    EntryState.LOADED: frozenset({EntryState.EVICTING}),
    EntryState.EVICTING: frozenset({EntryState.GONE}),
    EntryState.GONE: frozenset(),
    EntryState.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the entry's state machine does not allow (a bug in the cache)."""


class Table:
    """The cache's live entries by canonical id, least recently used first, and what outlives them.

    `pins` (per id, set by `load(pin=...)`), `footprints` (per id: the measured readings of its
    loads, whose median is its footprint) and `estimates` (per id: that footprint's total, else the
    backend's estimate) are remembered across loads and unloads; an entry reads them.
    """

    __slots__ = ("_entries", "estimates", "footprints", "pins")

    def __init__(self) -> None:
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.pins: dict[str, bool] = {}
        self.footprints = Footprints()
        self.estimates: dict[str, int] = {}

    def create(
        self,
        spec: ModelSpec,
        backend: Backend,
        *,
        now: float,
        fetch: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Entry:
        """A new entry for `spec`, in the table from now on (DOWNLOADING with `fetch`, else ADMITTING).

        Its `load_done` future belongs to `loop` (default: the running loop)."""
        if spec.id in self._entries:
            raise IllegalTransition(f"model {spec.id} already has a live entry")
        load_done = (loop if loop is not None else asyncio.get_running_loop()).create_future()
        entry = Entry(self, spec, backend, now=now, fetch=fetch, load_done=load_done)
        self._entries[spec.id] = entry
        return entry

    def get(self, model_id: str) -> Entry | None:
        return self._entries.get(model_id)

    def values(self) -> Iterator[Entry]:
        """Live entries, least recently used first (a copy: safe to change the table meanwhile)."""
        return iter(list(self._entries.values()))

    def most_recent_first(self) -> Iterator[Entry]:
        return reversed(self._entries.values())

    def touch(self, entry: Entry) -> None:
        """Mark `entry` as the most recently used."""
        self._entries.move_to_end(entry.spec.id)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: object) -> bool:
        return isinstance(entry, Entry) and self._entries.get(entry.spec.id) is entry

    def _discard(self, entry: Entry) -> None:
        if self._entries.get(entry.spec.id) is entry:
            del self._entries[entry.spec.id]


class Entry:
    """One model in the cache. See `ModelCache` for the rules these fields implement.

    Reference accounting: `refs` counts leases held (`in_use`), `pending` counts requests waiting
    for this model's load (they are granted a reference the moment the load completes, with no
    await in between, so nothing can evict the model under them). A model is evictable only while
    it is LOADED with `refs == 0` and `pending == 0`. Times are the cache clock's monotonic seconds;
    the snapshot turns them into wall time.
    """

    __slots__ = (
        "_state",
        "_table",
        "backend",
        "created",
        "deadline",
        "download_started",
        "evicted",
        "footprint",
        "idle_since",
        "keep_alive",
        "last_used",
        "lease",
        "load_done",
        "load_started",
        "loaded_at",
        "out_of_memory",
        "pending",
        "refs",
        "reload",
        "spec",
        "task",
        "unload_reason",
    )

    def __init__(
        self,
        table: Table,
        spec: ModelSpec,
        backend: Backend,
        *,
        now: float,
        fetch: bool,
        load_done: asyncio.Future[None],
    ) -> None:
        self._table = table
        self._state = EntryState.DOWNLOADING if fetch else EntryState.ADMITTING
        self.spec = spec
        self.backend = backend
        self.lease: Lease | None = (
            None  # the Lease every hit yields (built once per load); None unless LOADED
        )
        self.refs = 0
        self.pending = 0
        self.keep_alive: float | None = None  # the latest request's override
        self.unload_reason: EvictionReason | None = None  # unload scheduled for the last release
        self.created = now
        self.download_started: float | None = None  # DownloadStarted was published
        self.load_started: float | None = None  # LoadStarted was published
        self.loaded_at: float | None = None
        self.last_used = now
        self.idle_since: float | None = None  # the last reference went
        self.deadline: float | None = None  # idle expiry, None while none applies
        self.footprint: Mapping[str, int] = {}  # measured, per device; {} until (or unless) measured
        self.reload = False
        self.out_of_memory = False
        self.load_done = load_done  # result None when loaded; a CacheError when the load failed
        self.task: asyncio.Task[None] | None = None  # the load task
        self.evicted: asyncio.Task[None] | None = None  # the eviction task, once started

    # -------------------------------------------------------------- state machine

    @property
    def state(self) -> EntryState:
        return self._state

    def to(self, state: EntryState) -> None:
        """Move to `state`; raises IllegalTransition unless the state machine allows it.

        Entering GONE or FAILED takes the entry out of its table.
        """
        if state not in TRANSITIONS[self._state]:
            raise IllegalTransition(f"model {self.spec.id}: {self._state.value} -> {state.value}")
        self._state = state
        if state not in LIVE:
            self._table._discard(self)

    # -------------------------------------------------------------- derived facts

    @property
    def admitted(self) -> bool:
        """Counts toward max_models and the memory budget (room was made for it)."""
        return self._state in ADMITTED_STATES

    @property
    def loading(self) -> bool:
        return self._state in LOADING_STATES

    @property
    def idle(self) -> bool:
        """Loaded and nobody holds or waits for it: a candidate for eviction."""
        return self._state is EntryState.LOADED and self.refs == 0 and self.pending == 0

    @property
    def handle(self) -> Any:
        lease = self.lease
        return None if lease is None else lease.handle

    @property
    def pinned(self) -> bool:
        return self._table.pins.get(self.spec.id, self.spec.pin)

    @property
    def measured(self) -> bool:
        return bool(self.footprint)

    @property
    def footprint_bytes(self) -> int:
        """The measured total, else the estimate (0 before the estimate is known)."""
        footprint = self.footprint
        if footprint:
            return sum(footprint.values())
        return self._table.estimates.get(self.spec.id, 0)

    @property
    def phase(self) -> str | None:
        """ "downloading", "waiting" (for room), "loading", or None once loaded."""
        state = self._state
        if state is EntryState.DOWNLOADING:
            return "downloading"
        if state is EntryState.ADMITTING:
            return "waiting"
        if state is EntryState.LOADING:
            return "loading"
        return None

    def __repr__(self) -> str:
        return f"<Entry {self.spec.id} {self._state.value} refs={self.refs} pending={self.pending}>"
