"""ModelCache: single-flight loads, reference counts, idle deadlines, LRU by count and bytes, pins.

The cache lives on one asyncio event loop. Its table (`Entry` records) is only read and written on
that loop, so no lock guards it; the blocking work (backend.footprint, backend.load,
backend.unload with gc + malloc_trim) runs in the loop's default executor and hands its results
back through futures. What needs care is every `await`: the state a coroutine looked at before it
may have changed after it, so each one re-checks (see the comments at the await points).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any

from earshot.cache import memory
from earshot.cache.entry import Entry, EntryState
from earshot.cache.errors import (
    CacheBusy,
    CacheClosed,
    CacheError,
    CacheFull,
    ModelLoadError,
    ModelLoadTimeout,
    UnknownModel,
)
from earshot.cache.events import (
    CacheEvent,
    Coalesced,
    Evicted,
    EvictionReason,
    Hit,
    Loaded,
    LoadFailed,
    LoadFailureKind,
    LoadStarted,
    Miss,
    Observer,
)
from earshot.cache.lease import Lease
from earshot.cache.planning import plan_room
from earshot.cache.protocol import (
    Backend,
    BackendOutOfMemory,
    Clock,
    MemoryProbe,
    ModelSpec,
    SystemClock,
    rss_probe,
)
from earshot.cache.state import CacheConfig, CacheSnapshot, ModelState
from earshot.cache.timing import Expired, Signal, wait_until
from earshot.cache.workers import estimate_footprint, load_measured, unload_released

__all__ = ["Lease", "ModelCache"]

logger = logging.getLogger("earshot.cache")

_LOADING = EntryState.LOADING
_LOADED = EntryState.LOADED
_EVICTING = EntryState.EVICTING
_GONE = EntryState.GONE

# An idle deadline this close to now counts as reached: a clock's sleep may end a hair early
# (asyncio rounds to its clock resolution; float sums differ in the last bit).
_DEADLINE_SLACK = 1e-6


class ModelCache:
    """Holds loaded models for the API layer; every decision is published as an event.

    Requests: `acquire(model_id)` yields a `Lease` and holds a reference until the block exits. A
    model with references (or requests waiting for its load) is never evicted, for any reason.
    Outcomes: hit (loaded), miss (this request starts the load), coalesced (waits for the load under
    way: N concurrent cold requests make one `backend.load`). A failed load leaves nothing behind;
    every waiter gets the error (`ModelLoadError`, `ModelLoadTimeout`, `CacheFull`), the next
    request retries.

    Idle expiry: the timeout in force is the latest request's `keep_alive`, else `spec.idle_timeout`,
    else `config.idle_timeout` (like Ollama, a request without keep_alive resets it to the default).
    -1 (any negative) never expires, 0 unloads when the last reference goes, N seconds after it.
    Expiry is by deadline: one task sleeps on `clock.sleep` until the earliest deadline. A release
    whose deadline is earlier than the scheduled wake-up replaces that task; a deadline that goes
    away (the model is acquired again) or moves later leaves it, and the early wake-up just finds
    nothing due and sleeps again until the next deadline. No periodic scan.

    Room: `max_models` and `memory_budget_bytes` count every admitted model: loads in progress,
    loaded models, and models being unloaded (their memory is not back yet). A new load first gets
    its footprint estimate (the last measured footprint of that id, else `backend.footprint`, else
    `spec.size_bytes`), then plans room (`plan_room`): evict least recently used idle models
    (reason `capacity` while the count is over, `memory` while only bytes are), wait for those
    unloads to complete, plan again; when no plan exists (everything else in use or loading) it
    waits for a change (a release, an unload, a load ending) up to `load_timeout`, then fails with
    `CacheFull`. Loads plan independently (no queue): whichever finds room first goes first.

    Pinned models (`spec.pin`, `load(pin=True)`, preloads when `config.pin_preloaded`) never expire
    by idleness. They still count toward `max_models` and the budget, and they are evicted for
    capacity or memory only when no unpinned idle candidate is left (a pin is a strong preference,
    not a guarantee that can deadlock the cache). A pin set by `load(pin=...)` is remembered per id,
    also across unloads.

    Thrash: the last eviction time of each id is kept; a load started less than
    `config.thrash_window` seconds after it is a reload (`LoadStarted.reload`, `Loaded.reload`).

    Out of memory: a `BackendOutOfMemory` from a load evicts every idle model (unpinned ones;
    pinned ones only when there is no unpinned one; reason `memory`) and retries once, within the
    same load deadline.

    Back-pressure: at most `config.max_waiting` requests wait in the cache at once (for a load, for
    room, or for an unload of the model they want to finish); the next one gets `CacheBusy` at once.
    Hits never wait.

    Observers are called synchronously, in the task that caused the event (a request's task for
    Hit/Miss/Coalesced; the load task, which inherits the starting request's context, for
    LoadStarted/Loaded/LoadFailed; the eviction task for Evicted). One that raises is logged and
    ignored.
    """

    def __init__(
        self,
        resolve: Callable[[str], ModelSpec | None],
        backends: Mapping[str, Backend],
        config: CacheConfig,
        *,
        observers: Sequence[Observer] = (),
        clock: Clock | None = None,
        memory_probe: MemoryProbe | None = None,
        release_memory: Callable[[], None] | None = None,
    ) -> None:
        """`release_memory` runs in the worker thread after each unload (default: gc.collect() and
        malloc_trim(0), see `earshot.cache.memory`); tests pass a no-op to skip the full collections."""
        self._resolve = resolve
        self._backends = dict(backends)
        self._config = config
        self._observers: list[Observer] = list(observers)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._probe: MemoryProbe = memory_probe if memory_probe is not None else rss_probe
        self._release_memory = release_memory if release_memory is not None else memory.release_memory
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._estimates: dict[str, int] = {}  # footprint estimate per id: last measured, else backend's
        self._pins: dict[str, bool] = {}
        self._last_evicted: dict[str, float] = {}  # monotonic, per id (thrash detection)
        self._waiting = 0
        self._changed = Signal()
        self._expiry_task: asyncio.Task[None] | None = None
        self._expiry_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._late_unloads: set[asyncio.Future[int]] = set()
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._preloading = 0

    # ------------------------------------------------------------------ requests

    @asynccontextmanager
    async def acquire(self, model_id: str, keep_alive: float | None = None) -> AsyncIterator[Lease]:
        """Hold a reference to the loaded model for the duration of the block.

        Raises UnknownModel, ModelLoadError / ModelLoadTimeout, CacheFull, CacheBusy, CacheClosed.
        `keep_alive` overrides the idle timeout that applies after this request's release.
        """
        entry, lease = await self._take(model_id, keep_alive)
        try:
            yield lease
        finally:
            self._release(entry)

    async def load(self, model_id: str, keep_alive: float | None = None, *, pin: bool | None = None) -> Lease:
        """Load the model (or touch it if loaded) and release it at once: the preload API.

        The returned Lease tells the outcome; its handle must not be used. `pin=True` pins the
        model, `pin=False` unpins it (also one pinned by its spec); `None` leaves the pin as is.
        """
        entry, lease = await self._take(model_id, keep_alive)
        try:
            if pin is not None:
                entry.pinned = pin
                self._pins[entry.spec.id] = pin
        finally:
            self._release(entry)
        return lease

    async def unload(self, model_id: str, reason: EvictionReason = EvictionReason.MANUAL) -> str:
        """Unload the model now if idle ("unloaded"), or when its last reference goes ("scheduled").

        "not_loaded" when it is not in the cache. A scheduled unload stays scheduled until the
        model is next idle: acquires in the meantime are served and cancel nothing. A model still
        loading counts as in use. Raises UnknownModel for an id outside the catalog.
        """
        entry = self._entries.get(model_id)
        if entry is None:
            entry = self._entries.get(self._spec_of(model_id).id)
        if entry is None:
            return "not_loaded"
        if entry.state is _LOADED and entry.idle:
            self._start_eviction(entry, reason)
        if entry.state is _EVICTING:
            assert entry.evicted is not None
            await asyncio.wait((entry.evicted,))  # never cancels the unload itself
            return "unloaded"
        entry.unload_reason = reason
        return "scheduled"

    async def preload(self, model_ids: Sequence[str]) -> None:
        """Load each model, one after the other, and return when all are loaded or failed.

        Sequential on purpose: the footprint is measured as the process memory delta around each
        load, which concurrent loads would blur. Failures are logged (logger "earshot.cache") and
        the cache keeps serving. Pins the models when `config.pin_preloaded`. `ready` is False until
        it returns. The app can run it as a background task, or use `start_preload`.
        """
        ids = list(model_ids)
        self._preloading += len(ids)
        await self._preload(ids)

    def start_preload(self, model_ids: Sequence[str]) -> asyncio.Task[None]:
        """`preload` as a background task; `ready` turns False before this returns (no race)."""
        ids = list(model_ids)
        self._preloading += len(ids)
        return self._spawn(self._preload(ids), detached=True)

    @property
    def ready(self) -> bool:
        """True once every preload finished (loaded or failed); True at once if there were none."""
        return self._preloading == 0

    @contextlib.contextmanager
    def waiting(self, model_id: str) -> Iterator[None]:
        """Count a request that waits outside the cache (for an inference slot of `model_id`) as a
        waiting request: CacheBusy at once past `max_waiting`, else counted until the block exits."""
        self._check_busy(model_id)
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1

    def subscribe(self, observer: Observer) -> None:
        """Add an observer; it receives every event published from now on."""
        self._observers.append(observer)

    def snapshot(self) -> CacheSnapshot:
        """The cache's state now: a pure read, no awaits, exact ages from the clock at call time."""
        now = self._clock.monotonic()
        wall = self._clock.wall()
        models = tuple(self._state_of(entry, now, wall) for entry in reversed(self._entries.values()))
        return CacheSnapshot(at=wall, models=models, waiting_requests=self._waiting, config=self._config)

    async def close(self) -> None:
        """Shut down: admit nothing new, wait for references up to `shutdown_grace`, unload all.

        New acquires raise CacheClosed at once, and so do loads still waiting for room. Requests
        holding or awaiting a model get up to `config.shutdown_grace` seconds (on the cache's clock)
        to finish; then loads still running are abandoned (their waiters get CacheClosed, a late
        handle is unloaded), the expiry task is cancelled, and every model is unloaded with reason
        `shutdown`, in use or not. Idempotent: later calls wait for the same shutdown.
        """
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._close_task)

    # ------------------------------------------------------------------ taking and releasing

    async def _take(self, model_id: str, keep_alive: float | None) -> tuple[Entry, Lease]:
        if self._closed:
            raise self._closed_error(model_id)
        entry = self._entries.get(model_id)
        if entry is not None and entry.state is _LOADED:
            self._grant(entry, keep_alive)
            if self._observers:
                self._publish(Hit(model=entry.spec.id, task=entry.spec.task.value, at=self._clock.wall()))
            lease = entry.lease
            assert lease is not None  # set whenever LOADED
            return entry, lease
        return await self._take_slow(self._spec_of(model_id), keep_alive)

    async def _take_slow(self, spec: ModelSpec, keep_alive: float | None) -> tuple[Entry, Lease]:
        backend = self._backends.get(spec.task.value)
        if backend is None:
            raise ModelLoadError(
                f"no backend serves task {spec.task.value!r} (model {spec.id})", model=spec.id
            )
        while True:
            if self._closed:
                raise self._closed_error(spec.id)
            entry = self._entries.get(spec.id)
            if entry is not None and entry.state is _LOADED:
                self._grant(entry, keep_alive)
                self._publish(Hit(model=spec.id, task=spec.task.value, at=self._clock.wall()))
                assert entry.lease is not None
                return entry, entry.lease
            self._check_busy(spec.id)
            if entry is not None and entry.state is _EVICTING:
                # Being unloaded (chosen as a victim a moment ago): wait for the unload, then start
                # over; by then it is absent (a miss) or someone else's load of it (coalesced).
                assert entry.evicted is not None
                self._waiting += 1
                try:
                    await asyncio.wait((entry.evicted,))
                finally:
                    self._waiting -= 1
                continue
            now = self._clock.wall()
            if entry is None:
                entry = self._new_entry(spec, backend)
                self._publish(Miss(model=spec.id, task=spec.task.value, at=now))
                entry.task = self._spawn(self._load(entry))
                outcome = "miss"
            else:
                self._publish(Coalesced(model=spec.id, task=spec.task.value, at=now))
                outcome = "coalesced"
            await self._wait_for_load(entry, keep_alive)
            return entry, Lease(entry.spec, entry.handle, outcome)

    async def _wait_for_load(self, entry: Entry, keep_alive: float | None) -> None:
        """Wait for `entry`'s load, then hold a reference to it (granted with no await in between)."""
        entry.pending += 1
        self._waiting += 1
        try:
            await asyncio.wait((entry.load_done,))  # never cancels the shared load
        except asyncio.CancelledError:
            self._waiting -= 1
            entry.pending -= 1
            if entry.idle:  # loaded meanwhile, and this was the last request that wanted it
                self._became_idle(entry)
            raise
        self._waiting -= 1
        entry.pending -= 1
        error = entry.load_done.exception()
        if error is not None:
            assert isinstance(error, CacheError)
            raise type(error)(error.message, model=error.model) from error.__cause__
        if entry.state is not _LOADED:  # loaded, then unloaded by a shutdown before this request resumed
            raise self._closed_error(entry.spec.id)
        self._grant(entry, keep_alive)

    def _grant(self, entry: Entry, keep_alive: float | None) -> None:
        entry.refs += 1
        entry.keep_alive = keep_alive
        entry.deadline = None
        entry.last_used_wall = self._clock.wall()
        self._entries.move_to_end(entry.spec.id)

    def _release(self, entry: Entry) -> None:
        entry.refs -= 1
        if entry.state is not _LOADED:  # unloaded by a shutdown while held
            return
        entry.last_used_wall = self._clock.wall()
        self._entries.move_to_end(entry.spec.id)
        if entry.refs == 0 and entry.pending == 0:
            self._became_idle(entry)

    def _became_idle(self, entry: Entry) -> None:
        """The last reference went: run a scheduled unload, or start the idle timer."""
        now = self._clock.monotonic()
        entry.idle_since = now
        if entry.unload_reason is not None:
            self._start_eviction(entry, entry.unload_reason)
        elif not self._closed and not entry.pinned:
            timeout = self._timeout_of(entry)
            if timeout == 0:
                self._start_eviction(entry, EvictionReason.IDLE)
            elif timeout > 0:
                entry.deadline = now + timeout
                self._schedule_expiry(entry.deadline)
        self._changed.notify()

    def _timeout_of(self, entry: Entry) -> float:
        if entry.keep_alive is not None:
            return entry.keep_alive
        if entry.spec.idle_timeout is not None:
            return entry.spec.idle_timeout
        return self._config.idle_timeout

    def _check_busy(self, model_id: str) -> None:
        limit = self._config.max_waiting
        if self._waiting >= limit:
            raise CacheBusy(
                f"cache busy: {self._waiting} requests already waiting for models "
                f"(max_waiting_requests={limit}); retry later",
                model=model_id,
            )

    # ------------------------------------------------------------------ idle expiry

    def _schedule_expiry(self, deadline: float) -> None:
        """Make sure the expiry task wakes up no later than `deadline`."""
        if self._expiry_at is not None and self._expiry_at <= deadline:
            return
        if self._expiry_task is not None:
            self._expiry_task.cancel()  # it only ever awaits its sleep: cancelling it is safe
        self._expiry_at = deadline
        self._expiry_task = self._spawn(self._expire(deadline), detached=True)

    async def _expire(self, deadline: float) -> None:
        await self._clock.sleep(deadline - self._clock.monotonic())
        # Nothing below awaits: a cancel can only land in the sleep above.
        self._expiry_task = None
        self._expiry_at = None
        now = self._clock.monotonic()
        nearest: float | None = None
        for entry in list(self._entries.values()):
            due = entry.deadline
            if due is None or entry.pinned or not entry.idle:
                continue
            if due <= now + _DEADLINE_SLACK:
                self._start_eviction(entry, EvictionReason.IDLE)
            elif nearest is None or due < nearest:
                nearest = due
        if nearest is not None:
            self._schedule_expiry(nearest)

    # ------------------------------------------------------------------ loading

    def _new_entry(self, spec: ModelSpec, backend: Backend) -> Entry:
        loop = asyncio.get_running_loop()
        entry = Entry(
            spec,
            backend,
            pinned=self._pins.get(spec.id, spec.pin),
            wall=self._clock.wall(),
            load_done=loop.create_future(),
        )
        self._entries[spec.id] = entry
        return entry

    async def _load(self, entry: Entry) -> None:
        """The load task of one entry: estimate, make room, load; settle `load_done` either way."""
        try:
            await self._estimate(entry)
            await self._admit(entry)
            handle, footprint = await self._load_in_worker(entry)
        except asyncio.CancelledError:
            self._fail(
                entry, CacheClosed(f"cache closed while loading model {entry.spec.id}", model=entry.spec.id)
            )
            raise
        except CacheError as err:
            self._fail(entry, err)
        except Exception as err:  # a bug must not leave the waiters hanging
            logger.exception("unexpected error loading model %s", entry.spec.id)
            self._fail(
                entry, ModelLoadError(f"loading model {entry.spec.id} failed: {err}", model=entry.spec.id)
            )
        else:
            self._loaded(entry, handle, footprint)

    async def _estimate(self, entry: Entry) -> None:
        spec = entry.spec
        estimate = self._estimates.get(spec.id)
        if estimate is None:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(None, estimate_footprint, entry.backend, spec)
            estimate = self._estimates.setdefault(spec.id, found)  # a measurement may have landed meanwhile
        entry.footprint_bytes = estimate
        budget = self._config.memory_budget_bytes
        if budget is not None and estimate > budget:
            raise CacheFull(
                f"cache full: model {spec.id} needs an estimated {estimate} bytes, more than the whole "
                f"memory budget ({budget} bytes); raise memory_budget_bytes or use a smaller model",
                model=spec.id,
            )
        if self._config.max_models is not None and self._config.max_models < 1:
            raise CacheFull(f"cache full: max_models is {self._config.max_models}", model=spec.id)

    async def _admit(self, entry: Entry) -> None:
        """Make room for `entry` under max_models and the memory budget, then mark it admitted."""
        config = self._config
        deadline: float | None = None
        timed_out = False
        while True:
            # Re-plan after every await: releases, other loads and unloads change the picture.
            if self._closed:
                raise self._closed_error(entry.spec.id)
            plan = plan_room(
                self._entries.values(), entry, max_models=config.max_models, budget=config.memory_budget_bytes
            )
            if plan is None:
                if timed_out:
                    raise CacheFull(self._full_message(entry), model=entry.spec.id)
                if deadline is None:
                    deadline = self._clock.monotonic() + config.load_timeout
                timed_out = not await self._changed.wait(self._clock, deadline)
                continue
            if not plan:
                entry.admitted = True  # counts toward the limits from here on (no await since the plan)
                return
            unloads = [self._start_eviction(victim, reason) for victim, reason in plan]
            await asyncio.wait(unloads)  # the evicted models' memory is back before the load starts

    def _full_message(self, entry: Entry) -> str:
        config = self._config
        held = sum(1 for e in self._entries.values() if e.admitted and e.state is not _GONE)
        return (
            f"cache full: {held} models loaded, all in use; waited {config.load_timeout:g}s for one to be "
            f"released to load {entry.spec.id} (max_models={config.max_models}, "
            f"memory_budget_bytes={config.memory_budget_bytes})"
        )

    async def _load_in_worker(self, entry: Entry) -> tuple[Any, dict[str, int]]:
        """backend.load in a worker thread, within load_timeout; on out-of-memory evict idle, retry once."""
        spec = entry.spec
        now = self._clock.monotonic()
        entry.load_started = now
        evicted_at = self._last_evicted.get(spec.id)
        entry.reload = evicted_at is not None and now - evicted_at < self._config.thrash_window
        self._publish(
            LoadStarted(model=spec.id, task=spec.task.value, at=self._clock.wall(), reload=entry.reload)
        )
        deadline = now + self._config.load_timeout
        try:
            return await self._attempt(entry, deadline)
        except BackendOutOfMemory as err:
            logger.warning(
                "out of memory loading model %s (%s); evicting idle models, retrying once", spec.id, err
            )
        await self._evict_idle_for(entry)
        try:
            return await self._attempt(entry, deadline)
        except BackendOutOfMemory as err:
            entry.out_of_memory = True
            raise ModelLoadError(
                f"out of memory loading model {spec.id}, even after evicting idle models: {err}",
                model=spec.id,
            ) from err

    async def _attempt(self, entry: Entry, deadline: float) -> tuple[Any, dict[str, int]]:
        spec = entry.spec
        timeout = ModelLoadTimeout(
            f"loading model {spec.id} took longer than model_load_timeout ({self._config.load_timeout:g}s)",
            model=spec.id,
        )
        if self._clock.monotonic() >= deadline:
            raise timeout
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, load_measured, entry.backend, spec, self._probe)
        try:
            return await wait_until(work, self._clock, deadline)
        except Expired:
            work.add_done_callback(functools.partial(self._discard_late_load, entry.backend, spec.id))
            raise timeout from None
        except asyncio.CancelledError:
            work.add_done_callback(functools.partial(self._discard_late_load, entry.backend, spec.id))
            raise
        except (BackendOutOfMemory, CacheError):
            raise
        except Exception as err:
            raise ModelLoadError(f"loading model {spec.id} failed: {err}", model=spec.id) from err

    def _discard_late_load(
        self, backend: Backend, model_id: str, work: asyncio.Future[tuple[Any, Any]]
    ) -> None:
        """A load nobody waits for any more finished: unload its handle (in a worker thread)."""
        if work.cancelled() or work.exception() is not None:
            return
        logger.warning("model %s finished loading after its load was abandoned; unloading it", model_id)
        box = [work.result()[0]]
        unload = work.get_loop().run_in_executor(
            None, unload_released, backend, box, self._probe, self._release_memory
        )
        self._late_unloads.add(unload)
        unload.add_done_callback(self._late_unloads.discard)

    async def _evict_idle_for(self, entry: Entry) -> None:
        """Out of memory: unload every idle model (unpinned ones; pinned only if there is no other)."""
        idle = [e for e in self._entries.values() if e.idle and e is not entry]
        victims = [e for e in idle if not e.pinned] or idle
        unloads = [self._start_eviction(e, EvictionReason.MEMORY) for e in victims]
        unloads += [
            e.evicted for e in self._entries.values() if e.state is _EVICTING and e.evicted is not None
        ]
        if unloads:
            await asyncio.wait(set(unloads))

    def _loaded(self, entry: Entry, handle: Any, footprint: dict[str, int]) -> None:
        spec = entry.spec
        now = self._clock.monotonic()
        entry.handle = handle
        entry.state = _LOADED
        entry.loaded_at = now
        entry.loaded_wall = self._clock.wall()
        entry.lease = Lease(spec, handle, "hit")
        total = sum(footprint.values())
        if total > 0:
            entry.footprint = MappingProxyType(footprint)
            entry.footprint_bytes = total
            entry.measured = True
            self._estimates[spec.id] = total
        else:  # unusable measurement: the estimate stands in, per device unknown
            entry.footprint = MappingProxyType({})
            entry.measured = False
        assert entry.load_started is not None
        self._publish(
            Loaded(
                model=spec.id,
                task=spec.task.value,
                at=entry.loaded_wall,
                duration_s=now - entry.load_started,
                footprint_bytes=entry.footprint_bytes,
                footprint=entry.footprint,
                measured=entry.measured,
                reload=entry.reload,
            )
        )
        entry.load_done.set_result(None)
        if entry.idle:  # every requester gave up meanwhile (or it was a bare load)
            self._became_idle(entry)
        self._changed.notify()
        self._trim_to_budget()

    def _fail(self, entry: Entry, error: CacheError) -> None:
        spec = entry.spec
        if entry.load_started is not None:
            kind = LoadFailureKind.TIMEOUT if isinstance(error, ModelLoadTimeout) else LoadFailureKind.FAILURE
            self._publish(
                LoadFailed(
                    model=spec.id,
                    task=spec.task.value,
                    at=self._clock.wall(),
                    duration_s=self._clock.monotonic() - entry.load_started,
                    error_kind=kind,
                    message=error.message,
                    out_of_memory=entry.out_of_memory,
                )
            )
        entry.state = _GONE
        entry.admitted = False
        if self._entries.get(spec.id) is entry:
            del self._entries[spec.id]
        if not entry.load_done.done():
            entry.load_done.set_exception(error)
            entry.load_done.exception()  # retrieved: no "never retrieved" warning when nobody waits
        self._changed.notify()

    def _trim_to_budget(self) -> None:
        """A measured footprint above its estimate can push the total over budget: evict idle LRU."""
        budget = self._config.memory_budget_bytes
        if budget is None:
            return
        plan = plan_room(self._entries.values(), None, max_models=None, budget=budget)
        for victim, reason in plan or ():
            self._start_eviction(victim, reason)

    # ------------------------------------------------------------------ unloading

    def _start_eviction(self, entry: Entry, reason: EvictionReason) -> asyncio.Task[None]:
        """Mark the entry as leaving (synchronously: no one can pick it up again) and unload it."""
        entry.state = _EVICTING
        entry.deadline = None
        task = self._spawn(self._evict(entry, reason))
        entry.evicted = task
        return task

    async def _evict(self, entry: Entry, reason: EvictionReason) -> None:
        spec = entry.spec
        now = self._clock.monotonic()
        idle_s = now - entry.idle_since if entry.refs == 0 and entry.idle_since is not None else 0.0
        resident_s = now - entry.loaded_at if entry.loaded_at is not None else 0.0
        box = [entry.handle]  # the worker takes the handle out of the box: no reference is left here
        entry.handle = None
        entry.lease = None
        released = 0
        try:
            loop = asyncio.get_running_loop()
            released = await loop.run_in_executor(
                None, unload_released, entry.backend, box, self._probe, self._release_memory
            )
        except Exception:
            logger.exception("unloading model %s failed", spec.id)
        finally:
            entry.state = _GONE
            entry.admitted = False
            if self._entries.get(spec.id) is entry:
                del self._entries[spec.id]
            self._last_evicted[spec.id] = self._clock.monotonic()
            self._changed.notify()
        self._publish(
            Evicted(
                model=spec.id,
                task=spec.task.value,
                at=self._clock.wall(),
                reason=reason,
                idle_s=idle_s,
                resident_s=resident_s,
                footprint_bytes=entry.footprint_bytes,
                released_bytes=released,
            )
        )

    # ------------------------------------------------------------------ preload and shutdown

    async def _preload(self, ids: list[str]) -> None:
        pin = True if self._config.pin_preloaded else None
        done = 0
        try:
            for model_id in ids:
                try:
                    await self.load(model_id, pin=pin)
                    logger.info("preloaded model %s", model_id)
                except CacheClosed:
                    logger.info("preload stopped: the cache is closing")
                    break
                except CacheError as err:
                    logger.error("preloading model %s failed: %s", model_id, err.message)
                except Exception:
                    logger.exception("preloading model %s failed", model_id)
                finally:
                    done += 1
                    self._preloading -= 1
        finally:
            self._preloading -= len(ids) - done

    async def _shutdown(self) -> None:
        self._closed = True
        self._changed.notify()  # loads waiting for room give up now
        deadline = self._clock.monotonic() + self._config.shutdown_grace
        while self._in_flight():
            if not await self._changed.wait(self._clock, deadline):
                break
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            self._expiry_task = None
            self._expiry_at = None
        loads = [e.task for e in self._entries.values() if e.state is _LOADING and e.task is not None]
        for task in loads:
            task.cancel()
        if loads:
            await asyncio.wait(loads)
        unloads: list[asyncio.Task[None]] = []
        for entry in list(self._entries.values()):
            if entry.state is _LOADED:
                unloads.append(self._start_eviction(entry, EvictionReason.SHUTDOWN))
            elif entry.state is _EVICTING and entry.evicted is not None:
                unloads.append(entry.evicted)
        if unloads:
            await asyncio.wait(unloads)

    def _in_flight(self) -> bool:
        return any(e.refs or e.pending or e.state is _LOADING for e in self._entries.values())

    # ------------------------------------------------------------------ helpers

    def _spec_of(self, model_id: str) -> ModelSpec:
        spec = self._resolve(model_id)
        if spec is None:
            raise UnknownModel(f"model {model_id!r} is not in the catalog")
        return spec

    @staticmethod
    def _closed_error(model_id: str) -> CacheClosed:
        return CacheClosed("the model cache is shutting down and admits no new requests", model=model_id)

    def _spawn(self, coro: Any, *, detached: bool = False) -> asyncio.Task[Any]:
        """Run `coro` as a task. A load or an eviction a request causes inherits the request's
        context (its trace and log ids); `detached` work (idle expiry, preload) that no request
        caused starts from an empty context, so it is never logged under an old request's ids."""
        context = contextvars.Context() if detached else None
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _publish(self, event: CacheEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                logger.exception("cache observer %r failed on event %s", observer, event.kind)

    def _state_of(self, entry: Entry, now: float, wall: float) -> ModelState:
        state = entry.state
        loading = state is _LOADING
        idle = entry.idle and entry.idle_since is not None
        deadline = entry.deadline
        return ModelState(
            id=entry.spec.id,
            task=entry.spec.task.value,
            loaded=state is _LOADED or state is _EVICTING,
            loading=loading,
            loading_since=entry.created_wall if loading else None,
            loaded_at=entry.loaded_wall,
            last_used_at=entry.last_used_wall,
            idle_seconds=now - entry.idle_since if idle and entry.idle_since is not None else None,
            expires_at=wall + (deadline - now) if idle and deadline is not None else None,
            in_use=entry.refs,
            pinned=entry.pinned,
            footprint=entry.footprint,
            footprint_bytes=entry.footprint_bytes,
            footprint_measured=entry.measured,
            waiting=entry.pending,
            keep_alive=self._timeout_of(entry),
        )
