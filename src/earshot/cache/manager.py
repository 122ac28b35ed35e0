"""ModelCache: single-flight loads, reference counts, idle deadlines, LRU by count and bytes, pins.

The cache lives on one asyncio event loop. Its table (`Entry` records in a `Table`) is only read
and written on that loop, so no lock guards it; the blocking work (backend.footprint, fetch, load,
unload with gc + malloc_trim) runs on the cache's `BlockingRunner` and hands its results back
through futures. What needs care is every `await`: the state a coroutine looked at before it may
have changed after it, so each one re-checks (see the comments at the await points).

Parts with a job each: `entry` (the record, its state machine and the table), `admission` (room
and its queue), `planning` (which models to evict, a pure function), `expiry` (idle deadlines),
`waiting` (back-pressure counts), `runner` (where blocking work runs), `workers` (the blocking
halves of loads and unloads). This module wires them and runs the requests.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

from earshot.cache import memory
from earshot.cache.admission import Admission
from earshot.cache.entry import LIVE, Entry, EntryState, Table
from earshot.cache.errors import (
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
    Downloaded,
    DownloadStarted,
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
from earshot.cache.expiry import IdleExpiry, due_entries, timeout_of
from earshot.cache.lease import Lease
from earshot.cache.protocol import (
    Backend,
    BackendOutOfMemory,
    BlockingRunner,
    Clock,
    MemoryProbe,
    ModelSpec,
    SystemClock,
    rss_probe,
)
from earshot.cache.runner import ExecutorRunner, own_pool
from earshot.cache.state import CacheConfig, CacheSnapshot, ModelState
from earshot.cache.timing import Expired, Signal, wait_until
from earshot.cache.waiting import WaitCounter
from earshot.cache.workers import estimate_footprint, load_measured, unload_released

__all__ = ["Lease", "ModelCache"]

logger = logging.getLogger("earshot.cache")

_DOWNLOADING = EntryState.DOWNLOADING
_ADMITTING = EntryState.ADMITTING
_LOADED = EntryState.LOADED
_EVICTING = EntryState.EVICTING
_GONE = EntryState.GONE
_FAILED = EntryState.FAILED


class ModelCache:
    """Holds loaded models for the API layer; every decision is published as an event.

    Requests: `acquire(model_id)` yields a `Lease` and holds a reference until the block exits. A
    model with references (or requests waiting for its load) is never evicted, for any reason.
    Outcomes: hit (loaded), miss (this request starts the load), coalesced (waits for the load under
    way: N concurrent cold requests make one `backend.load`). A failed load leaves nothing behind;
    every waiter gets the error (`ModelLoadError`, `ModelLoadTimeout`, `CacheFull`), the next
    request retries.

    A load goes through phases (`ModelState.phase`): "downloading" (only for backends with a
    `fetch` method: it runs under `download_timeout`, between `DownloadStarted` and `Downloaded`;
    a failure or timeout there is a failed load whose message says download), "waiting" (the
    footprint estimate, then room), "loading" (`backend.load`, under `load_timeout`).

    Idle expiry (`earshot.cache.expiry`): the timeout in force is the latest request's
    `keep_alive`, else `spec.idle_timeout`, else `config.idle_timeout` (like Ollama, a request
    without keep_alive resets it to the default). -1 (any negative) never expires, 0 unloads when
    the last reference goes, N seconds after it. By deadline, no periodic scan.

    Room (`earshot.cache.admission`): `max_models` and `memory_budget_bytes` count every admitted
    model: loads in progress, loaded models, and models being unloaded. A new load first gets its
    footprint estimate (the last measured footprint of that id, else `backend.footprint`, else
    `spec.size_bytes`), then plans room: evict least recently used idle models, wait for those
    unloads, plan again; with no plan (everything else in use or loading) it waits for a change up
    to `load_timeout`, then fails with `CacheFull`. Room waits are served in order: loads waiting
    for room queue first come, first served, and while the first one waits, the loaded models it
    needs evicted are held for it: new requests for them wait behind it (counted as waiting)
    instead of hitting, so a model in steady use is released once its requests in flight finish.

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

    Back-pressure: at most `config.max_waiting` requests wait at once (for a load, for room, for an
    unload of the model they want to finish, behind a hold, or outside the cache, counted through
    `waiting()`); the next one gets `CacheBusy` at once. Hits never wait, unless held for a load.

    Clients who leave: a request cancelled while it waits leaves the counts at once. A load that
    no request waits for any more (every requester, `load()` and preload calls included, was
    cancelled) is abandoned if it has not reached `backend.load` yet (still downloading or waiting
    for room): nothing is loaded for a request that is gone. A download already running finishes
    in its thread (its files stay for the next request); a `backend.load` already running finishes
    and the model stays cached, idle, as any other.

    Blocking work runs on `runner` (a `BlockingRunner`); by default on a small thread pool the
    cache owns (threads `earshot-load-N`, shut down by `close()`), never the loop's default
    executor, which inference streams share.

    Observers are called synchronously, in the task that caused the event (a request's task for
    Hit/Miss/Coalesced; the load task, which inherits the starting request's context, for
    DownloadStarted/Downloaded/LoadStarted/Loaded/LoadFailed; the eviction task for Evicted). One
    that raises is logged and ignored.
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
        runner: BlockingRunner | None = None,
    ) -> None:
        """`release_memory` runs in the worker thread around each unload (default: gc.collect() and
        malloc_trim(0), see `earshot.cache.memory`) and, when given, around each load too (default
        there: malloc_trim(0) alone); tests pass a no-op to skip the full collections.
        `runner` runs the blocking work (default: the cache's own pool, see the class docstring)."""
        self._resolve = resolve
        self._backends = dict(backends)
        self._config = config
        self._observers: list[Observer] = list(observers)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._probe: MemoryProbe = memory_probe if memory_probe is not None else rss_probe
        self._release_memory = release_memory if release_memory is not None else memory.release_memory
        # Around a load only the C heap is trimmed: a full gc.collect() twice cost a cold load of
        # tiny.en ~260 ms (bench cold, 594 vs 330 ms direct), and the load's temporaries are C++ or
        # refcounted Python, freed without it. A given release_memory (tests) serves both.
        self._trim_memory = release_memory if release_memory is not None else memory.trim_heap
        self._pool = own_pool() if runner is None else None
        self._runner: BlockingRunner = runner if runner is not None else ExecutorRunner(self._pool)
        self._table = Table()
        self._last_evicted: dict[str, float] = {}  # monotonic, per id (thrash detection)
        self._waits = WaitCounter(config.max_waiting)
        self._changed = Signal()
        self._closed = False
        self._admission = Admission(
            self._table,
            config,
            self._clock,
            self._changed,
            self._start_eviction,
            lambda: self._closed,
            self._closed_error,
        )
        self._expiry = IdleExpiry(self._clock, self._expire_due, self._spawn_detached)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._late_unloads: set[asyncio.Task[None]] = set()
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
                self._table.pins[entry.spec.id] = pin
        finally:
            self._release(entry)
        return lease

    async def unload(self, model_id: str, reason: EvictionReason = EvictionReason.MANUAL) -> str:
        """Unload the model now if idle ("unloaded"), or when its last reference goes ("scheduled").

        "not_loaded" when it is not in the cache. A scheduled unload stays scheduled until the
        model is next idle: acquires in the meantime are served and cancel nothing. A model still
        loading counts as in use. Raises UnknownModel for an id outside the catalog.
        """
        entry = self._table.get(model_id)
        if entry is None:
            entry = self._table.get(self._spec_of(model_id).id)
        if entry is None:
            return "not_loaded"
        if entry.idle:
            self._start_eviction(entry, reason)
        if entry.state is _EVICTING:
            assert entry.evicted is not None
            await asyncio.wait((entry.evicted,))  # never cancels the unload itself
            return "unloaded"
        entry.unload_reason = reason
        return "scheduled"

    def waiting(self, model_id: str) -> AbstractContextManager[None]:
        """Count a request that waits outside the cache (e.g. for an inference slot of `model_id`)
        toward `max_waiting`, `waiting_requests` and the model's `ModelState.waiting`, until the
        block exits. Raises CacheBusy at once when `max_waiting` requests already wait."""
        return self._waits.hold(model_id)

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
        return self._spawn_detached(self._preload(ids))

    @property
    def ready(self) -> bool:
        """True once every preload finished (loaded or failed); True at once if there were none."""
        return self._preloading == 0

    def subscribe(self, observer: Observer) -> None:
        """Add an observer; it receives every event published from now on."""
        self._observers.append(observer)

    def snapshot(self) -> CacheSnapshot:
        """The cache's state now: a pure read, no awaits, exact ages from the clock at call time.

        Wall times are the entries' monotonic times shifted by one offset read now.
        """
        now = self._clock.monotonic()
        wall = self._clock.wall()
        offset = wall - now
        models = tuple(self._state_of(entry, now, offset) for entry in self._table.most_recent_first())
        return CacheSnapshot(at=wall, models=models, waiting_requests=self._waits.total, config=self._config)

    async def close(self) -> None:
        """Shut down: admit nothing new, wait for references up to `shutdown_grace`, unload all.

        New acquires raise CacheClosed at once, and so do loads still waiting for room. Requests
        holding or awaiting a model get up to `config.shutdown_grace` seconds (on the cache's clock)
        to finish; then loads still running are abandoned (their waiters get CacheClosed, a late
        handle is unloaded), the expiry task is cancelled, and every model is unloaded with reason
        `shutdown`, in use or not. The cache's own thread pool is shut down last (work still running
        in it finishes). Idempotent: later calls wait for the same shutdown.
        """
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._close_task)

    # ------------------------------------------------------------------ taking and releasing

    async def _take(self, model_id: str, keep_alive: float | None) -> tuple[Entry, Lease]:
        if self._closed:
            raise self._closed_error(model_id)
        entry = self._table.get(model_id)
        if entry is not None and entry.state is _LOADED and entry.spec.id not in self._admission.held:
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
            entry = self._table.get(spec.id)
            if entry is not None and entry.state is _LOADED:
                if spec.id not in self._admission.held:
                    self._grant(entry, keep_alive)
                    self._publish(Hit(model=spec.id, task=spec.task.value, at=self._clock.wall()))
                    assert entry.lease is not None
                    return entry, entry.lease
                # Held for a load waiting for room: queue behind it, then start over.
                with self._waits.hold(spec.id):
                    await self._changed.wait(self._clock, None)
                continue
            if entry is not None and entry.state is _EVICTING:
                # Being unloaded (chosen as a victim a moment ago): wait for the unload, then start
                # over; by then it is absent (a miss) or someone else's load of it (coalesced).
                assert entry.evicted is not None
                with self._waits.hold(spec.id):
                    await asyncio.wait((entry.evicted,))
                continue
            self._waits.check(spec.id)  # refuse before counting a miss or starting a load
            now = self._clock.wall()
            if entry is None:
                entry = self._table.create(
                    spec,
                    backend,
                    now=self._clock.monotonic(),
                    fetch=callable(getattr(backend, "fetch", None)),
                )
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
        model_id = entry.spec.id
        self._waits.enter(model_id)
        entry.pending += 1
        try:
            await asyncio.wait((entry.load_done,))  # never cancels the shared load
        except asyncio.CancelledError:
            self._waits.leave(model_id)
            entry.pending -= 1
            if entry.pending == 0 and entry.state in (_DOWNLOADING, _ADMITTING):
                self._abandon(entry)  # the last request that wanted it left before backend.load
            elif entry.idle:  # loaded meanwhile, and this was the last request that wanted it
                self._became_idle(entry)
            raise
        self._waits.leave(model_id)
        entry.pending -= 1
        error = entry.load_done.exception()
        if error is not None:
            assert isinstance(error, CacheError)
            raise type(error)(error.message, model=error.model) from error.__cause__
        if entry.state is not _LOADED:  # loaded, then unloaded by a shutdown before this request resumed
            raise self._closed_error(model_id)
        self._grant(entry, keep_alive)

    def _grant(self, entry: Entry, keep_alive: float | None) -> None:
        entry.refs += 1
        entry.keep_alive = keep_alive
        entry.deadline = None
        entry.last_used = self._clock.monotonic()
        self._table.touch(entry)

    def _release(self, entry: Entry) -> None:
        entry.refs -= 1
        if entry.state is not _LOADED:  # unloaded by a shutdown while held
            return
        entry.last_used = self._clock.monotonic()
        self._table.touch(entry)
        if entry.refs == 0 and entry.pending == 0:
            self._became_idle(entry)

    def _became_idle(self, entry: Entry) -> None:
        """The last reference went: run a scheduled unload, or start the idle timer."""
        now = self._clock.monotonic()
        entry.idle_since = now
        if entry.unload_reason is not None:
            self._start_eviction(entry, entry.unload_reason)
        elif not self._closed and not entry.pinned:
            timeout = timeout_of(entry, self._config.idle_timeout)
            if timeout == 0:
                self._start_eviction(entry, EvictionReason.IDLE)
            elif timeout > 0:
                entry.deadline = now + timeout
                self._expiry.schedule(entry.deadline)
        self._changed.notify()

    def _expire_due(self, now: float) -> float | None:
        due, nearest = due_entries(self._table.values(), now)
        for entry in due:
            self._start_eviction(entry, EvictionReason.IDLE)
        return nearest

    # ------------------------------------------------------------------ loading

    async def _load(self, entry: Entry) -> None:
        """The load task of one entry: download, estimate, make room, load; settle `load_done`."""
        spec = entry.spec
        try:
            if entry.state is _DOWNLOADING:
                await self._download(entry)
                entry.to(_ADMITTING)
            await self._estimate(entry)
            await self._admission.admit(entry)
            handle, footprint = await self._load_in_worker(entry)
        except asyncio.CancelledError:
            if entry.state in LIVE:  # cancelled by shutdown (an abandoned entry is gone already)
                self._fail(entry, CacheClosed(f"cache closed while loading model {spec.id}", model=spec.id))
            raise
        except CacheError as err:
            self._fail(entry, err)
        except Exception as err:  # a bug must not leave the waiters hanging
            logger.exception("unexpected error loading model %s", spec.id)
            self._fail(entry, ModelLoadError(f"loading model {spec.id} failed: {err}", model=spec.id))
        else:
            self._loaded(entry, handle, footprint)

    async def _download(self, entry: Entry) -> None:
        """The download phase: backend.fetch on the runner, within download_timeout."""
        spec = entry.spec
        started = self._clock.monotonic()
        entry.download_started = started
        self._publish(DownloadStarted(model=spec.id, task=spec.task.value, at=self._clock.wall()))
        fetch = entry.backend.fetch  # type: ignore[attr-defined]  # present: checked at creation
        work = asyncio.ensure_future(self._runner.run(fetch, spec))
        work.add_done_callback(_retrieve)
        timeout = self._config.download_timeout
        try:
            await wait_until(work, self._clock, started + timeout)
        except Expired:
            raise ModelLoadTimeout(
                f"downloading model {spec.id} took longer than download_timeout ({timeout:g}s)", model=spec.id
            ) from None
        except (asyncio.CancelledError, CacheError):
            raise
        except Exception as err:
            raise ModelLoadError(f"downloading model {spec.id} failed: {err}", model=spec.id) from err
        self._publish(
            Downloaded(
                model=spec.id,
                task=spec.task.value,
                at=self._clock.wall(),
                duration_s=self._clock.monotonic() - started,
            )
        )

    async def _estimate(self, entry: Entry) -> None:
        spec = entry.spec
        estimates = self._table.estimates
        estimate = estimates.get(spec.id)
        if estimate is None:
            found = await self._runner.run(estimate_footprint, entry.backend, spec)
            estimate = estimates.setdefault(spec.id, found)  # a measurement may have landed meanwhile
        budget = self._config.memory_budget_bytes
        if budget is not None and estimate > budget:
            raise CacheFull(
                f"cache full: model {spec.id} needs an estimated {estimate} bytes, more than the whole "
                f"memory budget ({budget} bytes); raise memory_budget_bytes or use a smaller model",
                model=spec.id,
            )
        if self._config.max_models is not None and self._config.max_models < 1:
            raise CacheFull(f"cache full: max_models is {self._config.max_models}", model=spec.id)

    async def _load_in_worker(self, entry: Entry) -> tuple[Any, dict[str, int]]:
        """backend.load on the runner, within load_timeout; on out-of-memory evict idle, retry once."""
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
        await self._admission.evict_idle_for(entry)
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
        work = asyncio.ensure_future(
            self._runner.run(load_measured, entry.backend, spec, self._probe, self._trim_memory)
        )
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
        """A load nobody waits for any more finished: unload its handle (on the runner)."""
        if work.cancelled() or work.exception() is not None:
            return
        logger.warning("model %s finished loading after its load was abandoned; unloading it", model_id)
        box = [work.result()[0]]
        unload = work.get_loop().create_task(self._late_unload(backend, model_id, box))
        self._late_unloads.add(unload)
        unload.add_done_callback(self._late_unloads.discard)

    async def _late_unload(self, backend: Backend, model_id: str, box: list[Any]) -> None:
        try:
            await self._runner.run(unload_released, backend, box, self._probe, self._release_memory)
        except RuntimeError:  # the cache's pool is shut down: the process is exiting
            logger.warning("model %s finished loading after shutdown; left to the process exit", model_id)
        except Exception:
            logger.exception("unloading the late load of model %s failed", model_id)

    def _loaded(self, entry: Entry, handle: Any, footprint: dict[str, int]) -> None:
        spec = entry.spec
        now = self._clock.monotonic()
        entry.to(_LOADED)
        entry.loaded_at = now
        entry.lease = Lease(spec, handle, "hit")
        reading = sum(footprint.values())
        if reading > 0:
            entry.footprint = self._table.footprints.record(spec.id, footprint)  # median of the last loads
            self._table.estimates[spec.id] = entry.footprint_bytes
        # else: an unusable measurement; the estimate stands in, per device unknown (measured False)
        assert entry.load_started is not None
        self._publish(
            Loaded(
                model=spec.id,
                task=spec.task.value,
                at=self._clock.wall(),
                duration_s=now - entry.load_started,
                footprint_bytes=entry.footprint_bytes,
                footprint=entry.footprint,
                measured=entry.measured,
                reload=entry.reload,
                reading_bytes=reading,
            )
        )
        entry.load_done.set_result(None)
        if entry.idle:  # every requester gave up meanwhile (or it was a bare load)
            self._became_idle(entry)
        self._changed.notify()
        self._admission.trim_to_budget()

    def _fail(self, entry: Entry, error: CacheError) -> None:
        if entry.state not in LIVE:
            return
        spec = entry.spec
        started = entry.load_started if entry.load_started is not None else entry.download_started
        if started is not None:
            kind = LoadFailureKind.TIMEOUT if isinstance(error, ModelLoadTimeout) else LoadFailureKind.FAILURE
            self._publish(
                LoadFailed(
                    model=spec.id,
                    task=spec.task.value,
                    at=self._clock.wall(),
                    duration_s=self._clock.monotonic() - started,
                    error_kind=kind,
                    message=error.message,
                    out_of_memory=entry.out_of_memory,
                    phase="load" if entry.load_started is not None else "download",
                )
            )
        self._retire(entry, _FAILED, error)

    def _abandon(self, entry: Entry) -> None:
        """No request waits for this load any more, and backend.load has not started: drop it."""
        logger.info("load of model %s abandoned before it started: no request waits for it", entry.spec.id)
        self._retire(
            entry, _GONE, CacheClosed(f"load of model {entry.spec.id} abandoned", model=entry.spec.id)
        )
        if entry.task is not None:
            entry.task.cancel()

    def _retire(self, entry: Entry, state: EntryState, error: CacheError | None = None) -> None:
        """The one teardown: the entry leaves the table (GONE or FAILED) and its load's waiters learn."""
        entry.to(state)
        self._admission.withdraw(entry)
        if not entry.load_done.done():
            entry.load_done.set_exception(
                error or CacheClosed(f"model {entry.spec.id} left the cache", model=entry.spec.id)
            )
            entry.load_done.exception()  # retrieved: no "never retrieved" warning when nobody waits
        self._changed.notify()

    # ------------------------------------------------------------------ unloading

    def _start_eviction(self, entry: Entry, reason: EvictionReason) -> asyncio.Task[None]:
        """Mark the entry as leaving (synchronously: no one can pick it up again) and unload it."""
        entry.to(_EVICTING)
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
        entry.lease = None
        released = 0
        try:
            released = await self._runner.run(
                unload_released, entry.backend, box, self._probe, self._release_memory
            )
        except Exception:
            logger.exception("unloading model %s failed", spec.id)
        finally:
            self._last_evicted[spec.id] = self._clock.monotonic()
            self._retire(entry, _GONE)
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
        self._changed.notify()  # loads waiting for room, and requests held behind them, give up now
        deadline = self._clock.monotonic() + self._config.shutdown_grace
        while self._in_flight():
            if not await self._changed.wait(self._clock, deadline):
                break
        self._expiry.cancel()
        loads = [e.task for e in self._table.values() if e.loading and e.task is not None]
        for task in loads:
            task.cancel()
        if loads:
            await asyncio.wait(loads)
        unloads: list[asyncio.Task[None]] = []
        for entry in self._table.values():
            if entry.state is _LOADED:
                unloads.append(self._start_eviction(entry, EvictionReason.SHUTDOWN))
            elif entry.state is _EVICTING and entry.evicted is not None:
                unloads.append(entry.evicted)
        if unloads:
            await asyncio.wait(unloads)
        if self._late_unloads:
            await asyncio.wait(set(self._late_unloads))
        if self._pool is not None:
            self._pool.shutdown(wait=False)  # work still running (a late load) finishes in its thread

    def _in_flight(self) -> bool:
        return any(e.refs or e.pending or e.loading for e in self._table.values())

    # ------------------------------------------------------------------ helpers

    def _spec_of(self, model_id: str) -> ModelSpec:
        spec = self._resolve(model_id)
        if spec is None:
            raise UnknownModel(f"model {model_id!r} is not in the catalog")
        return spec

    @staticmethod
    def _closed_error(model_id: str) -> CacheClosed:
        return CacheClosed("the model cache is shutting down and admits no new requests", model=model_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, detached: bool = False) -> asyncio.Task[Any]:
        """Run `coro` as a task. A load or an eviction a request causes inherits the request's
        context (its trace and log ids); `detached` work (idle expiry, preload) that no request
        caused starts from an empty context, so it is never logged under an old request's ids."""
        context = contextvars.Context() if detached else None
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_detached(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self._spawn(coro, detached=True)

    def _publish(self, event: CacheEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                logger.exception("cache observer %r failed on event %s", observer, event.kind)

    def _state_of(self, entry: Entry, now: float, offset: float) -> ModelState:
        state = entry.state
        loading = entry.loading
        idle_since = entry.idle_since if entry.idle else None
        deadline = entry.deadline
        return ModelState(
            id=entry.spec.id,
            task=entry.spec.task.value,
            loaded=state is _LOADED or state is _EVICTING,
            loading=loading,
            loading_since=entry.created + offset if loading else None,
            loaded_at=entry.loaded_at + offset if entry.loaded_at is not None else None,
            last_used_at=entry.last_used + offset,
            idle_seconds=now - idle_since if idle_since is not None else None,
            expires_at=deadline + offset if idle_since is not None and deadline is not None else None,
            in_use=entry.refs,
            pinned=entry.pinned,
            footprint=entry.footprint,
            footprint_bytes=entry.footprint_bytes,
            footprint_measured=entry.measured,
            waiting=self._waits.of(entry.spec.id),
            keep_alive=timeout_of(entry, self._config.idle_timeout),
            phase=entry.phase,
        )


def _retrieve(work: asyncio.Future[Any]) -> None:
    """Mark an outcome nobody may wait for any more (a download past its timeout) as retrieved."""
    if not work.cancelled():
        work.exception()
