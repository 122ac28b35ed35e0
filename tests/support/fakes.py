"""Test doubles for the model cache: a controllable backend, memory, clock and executor.

- `FakeBackend` implements the cache's `Backend` protocol. Loads are instant by default and can be
  made slow (`load_delay`), blocked until a test lets them go (`block`/`unblock`), failing
  (`fail_next`) or out of memory (`oom_next`). It counts load attempts, successful loads and
  unloads, and records every handle it unloaded, so a test can check that nothing in use was ever
  unloaded and nothing was leaked.
- `FetchingBackend` adds the optional download phase (`fetch`), blockable and failing on demand.
- `FakeMemory` is a per-device byte counter the backends add to on load and subtract from on
  unload; it is also a `MemoryProbe` (call it), so the cache measures exact footprints.
- `FakeClock` implements the cache's `Clock`: time moves only when a test calls `advance()`, which
  also wakes the sleepers whose deadline passed. TTLs of hours are tested without waiting.
- `InlineExecutor` runs "worker thread" jobs inline, for fully deterministic single-threaded
  tests (set it as the loop's default executor). Blocked loads need real threads: don't use both.
  `ManualExecutor` queues the jobs until the test runs them: loads and unloads stay in progress
  for as long as a test wants, still deterministic and single-threaded.
- `eventually()` polls a condition while the event loop and worker threads make progress.
- `EventRecorder` (an observer that keeps events), `Catalog`/`make_spec` (a resolve function over
  test specs) and `cache_harness()` (a ModelCache wired to all of the above).

Everything here is thread-safe where the cache calls it from worker threads (backend methods and
the memory probe).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from earshot.cache.entry import Entry, EntryState, Table
from earshot.cache.events import CacheEvent
from earshot.cache.manager import ModelCache
from earshot.cache.protocol import BackendOutOfMemory, BlockingRunner, ModelSpec, Task
from earshot.cache.runner import ExecutorRunner
from earshot.cache.state import CacheConfig

E = TypeVar("E", bound=CacheEvent)

__all__ = [
    "LOOP_EXECUTOR",
    "CacheHarness",
    "Catalog",
    "EventRecorder",
    "FakeBackend",
    "FakeClock",
    "FakeHandle",
    "FakeLoadError",
    "FakeMemory",
    "FetchingBackend",
    "InlineExecutor",
    "ManualExecutor",
    "cache_harness",
    "eventually",
    "make_entry",
    "make_spec",
]


class FakeLoadError(RuntimeError):
    """What a `FakeBackend` load raises when told to fail (a plain, non-OOM load failure)."""


class FakeMemory:
    """Bytes allocated per device by fake models; calling it reads them (a `MemoryProbe`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: Counter[str] = Counter()
        self._retained: Counter[str] = Counter()

    def add(self, device: str, nbytes: int) -> None:
        with self._lock:
            self._bytes[device] += nbytes

    def retain(self, nbytes: int, device: str = "cpu") -> None:
        """Memory freed by someone else (a request's buffers) that the allocator keeps until `trim`."""
        with self._lock:
            self._bytes[device] += nbytes
            self._retained[device] += nbytes

    def trim(self) -> None:
        """A `release_memory` for tests: give the retained memory back (what malloc_trim does)."""
        with self._lock:
            self._bytes.subtract(self._retained)
            self._retained.clear()

    def __call__(self) -> Mapping[str, int]:
        with self._lock:
            return dict(self._bytes)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._bytes.values())


@dataclass(eq=False)
class FakeHandle:
    """A loaded fake model. `unloaded` turns True when the backend unloads it."""

    model_id: str
    serial: int  # 1, 2, ... over all loads of one backend
    footprint: int
    device: str
    unloaded: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class FakeBackend:
    """A `Backend` for tests. See the module docstring; every knob is per model id or for all.

    footprints: bytes each model really takes when loaded (what `FakeMemory` grows by); default
        `footprint` for ids not listed.
    estimates: what `footprint(spec)` answers (the pre-load estimate); defaults to the real size.
    load_delay: seconds every load sleeps (real time, in the worker thread).
    track_memory: False makes loads invisible to the memory probe (the cache then falls back to
        the estimate, `measured=False`).
    """

    def __init__(
        self,
        *,
        footprint: int = 100,
        footprints: Mapping[str, int] | None = None,
        estimates: Mapping[str, int] | None = None,
        load_delay: float = 0.0,
        device: str = "cpu",
        memory: FakeMemory | None = None,
        track_memory: bool = True,
    ) -> None:
        self.default_footprint = footprint
        self.footprints = dict(footprints or {})
        self.estimates = dict(estimates or {})
        self.load_delay = load_delay
        self.device = device
        self.memory = memory if memory is not None else FakeMemory()
        self.track_memory = track_memory
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        self._failures: list[tuple[str | None, BaseException]] = []
        self._blocked: dict[str | None, threading.Event] = {}
        self._unload_gate: threading.Event | None = None
        # Observations (read them from the test; written under the lock by worker threads).
        self.load_calls: Counter[str] = Counter()  # attempts, per model id
        self.loads_ok: Counter[str] = Counter()  # successful loads, per model id
        self.unload_calls: Counter[str] = Counter()
        self.live: list[FakeHandle] = []  # loaded and not unloaded yet
        self.unloaded: list[FakeHandle] = []  # in unload order
        self.started: list[str] = []  # model ids, in the order their load calls began
        self.unloads_started: list[str] = []  # model ids, in the order their unload calls began
        self.threads: list[tuple[str, str]] = []  # (method, thread name) of every backend call

    # -------------------------------------------------------------- Backend protocol

    def load(self, spec: ModelSpec) -> FakeHandle:
        with self._lock:
            self.threads.append(("load", threading.current_thread().name))
            self.load_calls[spec.id] += 1
            self.started.append(spec.id)
            gate = self._blocked.get(spec.id) or self._blocked.get(None)
            failure = self._take_failure(spec.id)
        if gate is not None and not gate.wait(timeout=30):
            raise TimeoutError(f"FakeBackend: load of {spec.id} was blocked for 30 s and never unblocked")
        if self.load_delay:
            time.sleep(self.load_delay)
        if failure is not None:
            raise failure
        size = self.footprints.get(spec.id, self.default_footprint)
        handle = FakeHandle(spec.id, next(self._serial), size, self.device)
        if self.track_memory:
            self.memory.add(self.device, size)
        with self._lock:
            self.loads_ok[spec.id] += 1
            self.live.append(handle)
        return handle

    def unload(self, handle: FakeHandle) -> None:
        with self._lock:
            self.threads.append(("unload", threading.current_thread().name))
            self.unloads_started.append(handle.model_id)
        gate = self._unload_gate
        if gate is not None and not gate.wait(timeout=30):
            raise TimeoutError("FakeBackend: unload blocked for 30 s and never unblocked")
        with self._lock:
            self.unload_calls[handle.model_id] += 1
            if handle.unloaded:
                raise AssertionError(f"FakeBackend: handle {handle} unloaded twice")
            handle.unloaded = True
            self.live.remove(handle)
            self.unloaded.append(handle)
        if self.track_memory:
            self.memory.add(handle.device, -handle.footprint)

    def footprint(self, spec: ModelSpec) -> int:
        with self._lock:
            self.threads.append(("footprint", threading.current_thread().name))
        return self.estimates.get(spec.id, self.footprints.get(spec.id, self.default_footprint))

    # -------------------------------------------------------------- control

    def fail_next(
        self, model_id: str | None = None, *, times: int = 1, error: BaseException | None = None
    ) -> None:
        """The next `times` loads of `model_id` (None: of any model) raise `error` (FakeLoadError)."""
        with self._lock:
            for _ in range(times):
                self._failures.append((model_id, error or FakeLoadError(f"fake load failure of {model_id}")))

    def oom_next(self, model_id: str | None = None, *, times: int = 1) -> None:
        """The next `times` loads of `model_id` (None: any) raise BackendOutOfMemory."""
        self.fail_next(model_id, times=times, error=BackendOutOfMemory(f"fake OOM loading {model_id}"))

    def block(self, model_id: str | None = None) -> None:
        """Loads of `model_id` (None: all loads) wait in their worker thread until `unblock`."""
        with self._lock:
            self._blocked[model_id] = threading.Event()

    def unblock(self, model_id: str | None = None) -> None:
        with self._lock:
            gate = self._blocked.pop(model_id, None)
        if gate is not None:
            gate.set()

    def block_unloads(self) -> None:
        """Unloads wait in their worker thread until `unblock_unloads` (an eviction in progress)."""
        self._unload_gate = threading.Event()

    def unblock_unloads(self) -> None:
        gate, self._unload_gate = self._unload_gate, None
        if gate is not None:
            gate.set()

    def _take_failure(self, model_id: str) -> BaseException | None:
        for index, (target, error) in enumerate(self._failures):
            if target is None or target == model_id:
                del self._failures[index]
                return error
        return None

    # -------------------------------------------------------------- observation

    @property
    def loads(self) -> int:
        """Successful loads, all models."""
        with self._lock:
            return sum(self.loads_ok.values())

    @property
    def unloads(self) -> int:
        with self._lock:
            return sum(self.unload_calls.values())

    def live_ids(self) -> list[str]:
        with self._lock:
            return [h.model_id for h in self.live]

    async def wait_started(self, model_id: str | None = None, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until `count` load calls (of `model_id`, or any) have begun in worker threads."""

        def started() -> bool:
            with self._lock:
                return (self.started.count(model_id) if model_id else len(self.started)) >= count

        await eventually(
            started, timeout=timeout, what=f"{count} load(s) of {model_id or 'any model'} to start"
        )


class FetchingBackend(FakeBackend):
    """A FakeBackend with the optional download phase (`fetch`), which can be blocked or made to fail.

    `fetched` lists the model ids in the order their fetch calls began; `fetch_done` those that
    returned. Loads record whether their model's fetch had returned (`loaded_after_fetch`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fetched: list[str] = []
        self.fetch_done: list[str] = []
        self.loaded_after_fetch: list[bool] = []
        self._fetch_gate: threading.Event | None = None
        self._fetch_failures: list[BaseException] = []

    def fetch(self, spec: ModelSpec) -> None:
        with self._lock:
            self.threads.append(("fetch", threading.current_thread().name))
            self.fetched.append(spec.id)
            failure = self._fetch_failures.pop(0) if self._fetch_failures else None
        gate = self._fetch_gate
        if gate is not None and not gate.wait(timeout=30):
            raise TimeoutError("FetchingBackend: fetch blocked for 30 s and never unblocked")
        if failure is not None:
            raise failure
        with self._lock:
            self.fetch_done.append(spec.id)

    def load(self, spec: ModelSpec) -> FakeHandle:
        with self._lock:
            self.loaded_after_fetch.append(spec.id in self.fetch_done)
        return super().load(spec)

    def block_fetches(self) -> None:
        self._fetch_gate = threading.Event()

    def unblock_fetches(self) -> None:
        gate, self._fetch_gate = self._fetch_gate, None
        if gate is not None:
            gate.set()

    def fail_next_fetch(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._fetch_failures.append(error or FakeLoadError("fake download failure: repo not found"))


class FakeClock:
    """A `Clock` that stands still until `advance(seconds)`.

    `monotonic()` starts at `start` and `wall()` at `wall_start`; both move together. `sleep()`
    registers a deadline and waits; `advance()` moves time and wakes, in deadline order, every
    sleeper whose deadline is now reached (the woken tasks run when the test next yields to the
    loop, e.g. `await asyncio.sleep(0)` or `eventually()`). A sleep of 0 or less only yields.
    Call `advance` from the event loop's thread (as tests do), or from another thread: wake-ups are
    then handed to the sleepers' loop thread-safely.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut  # a cancelled sleep cancels fut; advance() skips it

    def advance(self, seconds: float) -> None:
        """Move both clocks forward and wake the sleepers that are due."""
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        with self._lock:
            self._now += seconds
            due = []
            while self._sleepers and self._sleepers[0][0] <= self._now:
                due.append(heapq.heappop(self._sleepers)[2])
        for fut in due:
            loop = fut.get_loop()
            if _on_loop_thread(loop):
                if not fut.done():
                    fut.set_result(None)
            else:
                loop.call_soon_threadsafe(_wake, fut)

    @property
    def sleepers(self) -> int:
        """Sleeps in progress (not woken, not cancelled)."""
        with self._lock:
            return sum(1 for _, _, fut in self._sleepers if not fut.done())

    def next_wakeup(self) -> float | None:
        """Monotonic deadline of the earliest sleep in progress, None when nobody sleeps."""
        with self._lock:
            pending = [deadline for deadline, _, fut in self._sleepers if not fut.done()]
        return min(pending, default=None)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class InlineExecutor(ThreadPoolExecutor):
    """Runs each submitted job at once in the submitting thread; for deterministic tests.

    `loop.set_default_executor(InlineExecutor())` makes every `run_in_executor(None, ...)` of the
    cache complete on the next loop iteration, with no threads. Jobs that block (a blocked
    FakeBackend load) would block the loop: use real threads for those tests.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as err:
            fut.set_exception(err)
        return fut


class ManualExecutor(ThreadPoolExecutor):
    """Queues each submitted job until the test runs it (`run_next`, `run_all`), in the test's thread.

    Set it as the loop's default executor to decide exactly when the cache's worker jobs (loads,
    unloads, footprint estimates) finish: a load stays "in progress" across any number of steps,
    deterministically. Jobs whose future was cancelled meanwhile are skipped.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self._jobs: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._jobs.append((fut, fn, args, kwargs))
        return fut

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def run_next(self) -> bool:
        """Run the oldest queued job; False when there was none."""
        if not self._jobs:
            return False
        fut, fn, args, kwargs = self._jobs.popleft()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as err:
                fut.set_exception(err)
        return True

    def run_all(self) -> int:
        """Run the jobs queued now (not ones they queue); return how many ran."""
        count = len(self._jobs)
        for _ in range(count):
            self.run_next()
        return count


async def eventually(
    condition: Callable[[], bool], *, timeout: float = 5.0, interval: float = 0.001, what: str = "condition"
) -> None:
    """Poll `condition` until true, letting the loop and worker threads run; fail after `timeout` s.

    Real time, but only to let worker threads finish their (instant) work: never use it to wait
    out a TTL, advance a `FakeClock` instead.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class EventRecorder:
    """An `Observer` that keeps every event; `of(Type)` filters, `kinds()` lists their kind names."""

    def __init__(self) -> None:
        self.events: list[CacheEvent] = []

    def __call__(self, event: CacheEvent) -> None:
        self.events.append(event)

    def of(self, kind: type[E], model: str | None = None) -> list[E]:
        return [e for e in self.events if isinstance(e, kind) and (model is None or e.model == model)]

    def kinds(self, model: str | None = None) -> list[str]:
        return [e.kind for e in self.events if model is None or e.model == model]

    def index(self, kind: type[CacheEvent], model: str) -> int:
        """Position of the first event of `kind` for `model` (ValueError if none)."""
        for position, event in enumerate(self.events):
            if isinstance(event, kind) and event.model == model:
                return position
        raise ValueError(f"no {kind.__name__} event for {model}")

    def clear(self) -> None:
        self.events.clear()


def make_spec(model_id: str, task: Task = Task.TRANSCRIPTION, **fields: Any) -> ModelSpec:
    """A catalog entry for tests (source "local", no path)."""
    return ModelSpec(id=model_id, task=task, source="local", **fields)


_PATH = {
    EntryState.ADMITTING: (),
    EntryState.LOADING: (EntryState.LOADING,),
    EntryState.LOADED: (EntryState.LOADING, EntryState.LOADED),
    EntryState.EVICTING: (EntryState.LOADING, EntryState.LOADED, EntryState.EVICTING),
}


def make_entry(
    model_id: str,
    size: int,
    *,
    state: EntryState = EntryState.LOADED,
    refs: int = 0,
    pending: int = 0,
    pinned: bool | None = None,
    table: Table | None = None,
    now: float = 0.0,
) -> Entry:
    """An `Entry` in `state`, reached through the state machine's own transitions, with `size` as
    its footprint estimate, for tests of the pure parts (planning, expiry). Its `load_done` future
    belongs to a loop closed at once: don't await it."""
    table = table if table is not None else Table()
    loop = asyncio.new_event_loop()
    try:
        entry = table.create(make_spec(model_id), FakeBackend(), now=now, fetch=False, loop=loop)
    finally:
        loop.close()
    table.estimates[model_id] = size
    if pinned is not None:
        table.pins[model_id] = pinned
    for step in _PATH[state]:
        entry.to(step)
    entry.refs = refs
    entry.pending = pending
    return entry


class Catalog:
    """A `resolve` callable over a fixed set of specs, with optional aliases."""

    def __init__(self, specs: Iterable[ModelSpec], aliases: Mapping[str, str] | None = None) -> None:
        self.specs = {spec.id: spec for spec in specs}
        self.aliases = dict(aliases or {})

    def __call__(self, model_id: str) -> ModelSpec | None:
        return self.specs.get(self.aliases.get(model_id, model_id))


@dataclass
class CacheHarness:
    """A ModelCache wired to fakes: what most cache tests start from."""

    cache: ModelCache
    backend: FakeBackend
    clock: FakeClock
    events: EventRecorder
    catalog: Catalog

    @property
    def memory(self) -> FakeMemory:
        return self.backend.memory

    def loaded_ids(self) -> list[str]:
        """Ids the snapshot shows loaded, most recently used first."""
        return [m.id for m in self.cache.snapshot().models if m.loaded]


# The cache's blocking work on the event loop's default executor, so that a test can set an
# `InlineExecutor` or `ManualExecutor` there and decide when worker jobs finish.
LOOP_EXECUTOR: BlockingRunner = ExecutorRunner(None)


def cache_harness(
    models: Iterable[str | ModelSpec] = ("a", "b", "c", "d"),
    *,
    backend: FakeBackend | None = None,
    clock: FakeClock | None = None,
    aliases: Mapping[str, str] | None = None,
    runner: BlockingRunner | None = LOOP_EXECUTOR,
    **config: Any,
) -> CacheHarness:
    """Build a cache over `models` (ids or specs, transcription task) with a FakeBackend, a FakeClock,
    an EventRecorder, and a no-op `release_memory` (no full gc per unload). `config` goes to CacheConfig.
    The blocking work runs on the loop's default executor (`LOOP_EXECUTOR`); `runner=None` gives
    the cache's own pool (its default), any other runner is passed on.
    """
    specs = [m if isinstance(m, ModelSpec) else make_spec(m) for m in models]
    backend = backend if backend is not None else FakeBackend()
    clock = clock if clock is not None else FakeClock()
    events = EventRecorder()
    catalog = Catalog(specs, aliases)
    cache = ModelCache(
        catalog,
        {Task.TRANSCRIPTION.value: backend, Task.SPEECH.value: backend},
        CacheConfig(**config),
        observers=[events],
        clock=clock,
        memory_probe=backend.memory,
        release_memory=lambda: None,
        runner=runner,
    )
    return CacheHarness(cache, backend, clock, events, catalog)
