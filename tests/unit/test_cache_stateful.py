"""A hypothesis state machine drives random request sequences through the cache and checks its
invariants after every step.

Deterministic and single-threaded: each machine has its own event loop whose default executor is
a `ManualExecutor`, so the cache's worker jobs (footprint estimates, loads, unloads) stay in
progress until the `run_worker_jobs` rule lets them finish; time is a FakeClock; every step runs
the loop until nothing changes any more. Requests are tasks that stay open (waiting, or holding a
lease) across steps, so loads, waits for room, releases, expiry, timeouts with late loads, manual
unloads, failures, clients that leave while they wait and requests counted as waiting outside
the cache (`ModelCache.waiting`) interleave in every order hypothesis can think of.

Besides the cache's promises (limits, nothing in use unloaded, accounting), the invariants check
its insides: the table holds exactly the live entries and each in a state the snapshot agrees
with, the room queue holds only loads waiting for room (first come first), what is held for the
queue's head is loaded, and no background task of the cache ever failed (an illegal state
transition would surface there).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from earshot.cache.entry import LIVE, EntryState
from earshot.cache.errors import CacheBusy, CacheClosed, CacheError, CacheFull, ModelLoadError
from earshot.cache.events import Evicted, Loaded
from earshot.cache.lease import Lease
from tests.support.fakes import FakeBackend, ManualExecutor, cache_harness, make_spec

SIZES = {"a": 100, "b": 200, "c": 300, "d": 150, "huge": 600}
MAX_MODELS = 2
BUDGET = 450
MODELS = st.sampled_from(["a", "b", "c", "d"] * 3 + ["huge"])  # the one that never fits, now and then
KEEP_ALIVE = st.sampled_from([None, None, 0, -1, 5, 100])
EXPECTED = (CacheBusy, CacheFull, ModelLoadError)  # ModelLoadTimeout is a ModelLoadError


class Request:
    """One client request: acquires, then holds its lease until the machine releases it."""

    def __init__(self, cm: AbstractAsyncContextManager[Lease]) -> None:
        self.cm = cm
        self.lease: Lease | None = None
        self.error: CacheError | None = None
        self.release = asyncio.Event()

        self.left = False  # the client went away (its task was cancelled) before it got a lease

    @property
    def holding(self) -> bool:
        return self.lease is not None and not self.release.is_set()

    @property
    def waiting(self) -> bool:
        return self.lease is None and self.error is None and not self.left

    async def run(self) -> None:
        try:
            self.lease = await self.cm.__aenter__()
        except CacheError as err:
            self.error = err
            return
        await self.release.wait()
        await self.cm.__aexit__(None, None, None)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.jobs = ManualExecutor()
        self.loop.set_default_executor(self.jobs)
        specs = [make_spec(m, idle_timeout=30 if m == "d" else None) for m in SIZES]
        self.h = cache_harness(
            specs,
            backend=FakeBackend(footprints=SIZES),
            max_models=MAX_MODELS,
            memory_budget_bytes=BUDGET,
            idle_timeout=60,
            load_timeout=20,
            thrash_window=100,
            max_waiting=5,
            shutdown_grace=0,
        )
        self.requests: list[Request] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.request_tasks: dict[int, asyncio.Task[None]] = {}  # id(request) -> its task
        self.unloads: list[asyncio.Task[str]] = []
        self.outside: list[AbstractContextManager[None]] = []  # requests counted through waiting()
        self.failures: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.failures.append(context))

    # ------------------------------------------------------------ driving the loop

    def _fingerprint(self) -> tuple[Any, ...]:
        snapshot = self.h.cache.snapshot()
        return (
            len(self.h.events.events),
            self.jobs.pending,
            snapshot.waiting_requests,
            tuple((m.id, m.loaded, m.loading, m.in_use, m.waiting) for m in snapshot.models),
            sum(t.done() for t in self.tasks),
            sum(t.done() for t in self.unloads),
        )

    async def _quiesce(self) -> None:
        stable, previous = 0, None
        for _ in range(5000):
            await asyncio.sleep(0)
            current = self._fingerprint()
            stable = stable + 1 if current == previous else 0
            previous = current
            if stable >= 20:
                return
        raise AssertionError("the cache never settled")

    def _settle(self, expected: tuple[type[CacheError], ...] = EXPECTED) -> None:
        self.loop.run_until_complete(self._quiesce())
        for task in self.tasks + self.unloads:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise AssertionError("a request failed unexpectedly") from task.exception()
        for request in self.requests:
            assert request.error is None or isinstance(request.error, expected), repr(request.error)
        for task in self.unloads:
            if task.done():
                assert task.result() in ("unloaded", "not_loaded", "scheduled")

    # ------------------------------------------------------------ rules

    def _drain_jobs(self) -> None:
        while self.jobs.run_next():
            self._settle()

    @rule(model=MODELS, keep_alive=KEEP_ALIVE, finish_jobs=st.booleans())
    def acquire(self, model: str, keep_alive: float | None, finish_jobs: bool) -> None:
        """A request; with finish_jobs, every worker job then runs (the load, the unloads for room)."""
        request = Request(self.h.cache.acquire(model, keep_alive))
        self.requests.append(request)
        task = self.loop.create_task(request.run())
        self.tasks.append(task)
        self.request_tasks[id(request)] = task
        self._settle()
        if finish_jobs:
            self._drain_jobs()

    @precondition(lambda self: any(r.holding for r in self.requests))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from([r for r in self.requests if r.holding])).release.set()
        self._settle()
        if data.draw(st.booleans(), label="finish_jobs"):
            self._drain_jobs()

    @precondition(lambda self: self.jobs.pending > 0)
    @rule(count=st.sampled_from([1, 2, 1000]))
    def run_worker_jobs(self, count: int) -> None:
        for _ in range(count):
            if not self.jobs.run_next():
                break
            self._settle()

    @rule(seconds=st.sampled_from([0.5, 4, 6, 21, 31, 61, 150]))
    def advance_clock(self, seconds: float) -> None:
        self.h.clock.advance(seconds)
        self._settle()

    @rule(model=MODELS)
    def unload(self, model: str) -> None:
        self.unloads.append(self.loop.create_task(self.h.cache.unload(model)))
        self._settle()

    @precondition(lambda self: any(r.waiting for r in self.requests))
    @rule(data=st.data())
    def client_leaves(self, data: st.DataObject) -> None:
        """A waiting client disconnects: its task is cancelled while it waits."""
        request = data.draw(st.sampled_from([r for r in self.requests if r.waiting]))
        request.left = True
        self.request_tasks[id(request)].cancel()
        self._settle()

    @rule(model=MODELS)
    def wait_outside(self, model: str) -> None:
        """A request waits for an inference slot, counted by the cache (or refused at once)."""
        cm = self.h.cache.waiting(model)
        try:
            cm.__enter__()
        except CacheBusy:
            return
        self.outside.append(cm)

    @precondition(lambda self: bool(self.outside))
    @rule()
    def stop_waiting_outside(self) -> None:
        self.outside.pop(0).__exit__(None, None, None)
        self._settle()

    @rule(model=MODELS, oom=st.booleans(), times=st.sampled_from([1, 2]))
    def fail_next_load(self, model: str, oom: bool, times: int) -> None:
        if oom:
            self.h.backend.oom_next(model, times=times)
        else:
            self.h.backend.fail_next(model, times=times)

    # ------------------------------------------------------------ invariants

    @invariant()
    def within_max_models(self) -> None:
        assert len(self.h.cache.snapshot().loaded) <= MAX_MODELS

    @invariant()
    def within_the_memory_budget(self) -> None:
        assert sum(m.footprint_bytes for m in self.h.cache.snapshot().loaded) <= BUDGET

    @invariant()
    def nothing_held_was_ever_unloaded(self) -> None:
        for request in self.requests:
            if request.holding:
                assert request.lease is not None
                assert not request.lease.handle.unloaded, f"{request.lease.spec.id} unloaded while in use"

    @invariant()
    def every_load_is_evicted_once_or_still_loaded(self) -> None:
        loaded_now = {m.id for m in self.h.cache.snapshot().loaded}
        loads = Counter(e.model for e in self.h.events.of(Loaded))
        evictions = Counter(e.model for e in self.h.events.of(Evicted))
        for model in SIZES:
            assert loads[model] == evictions[model] + (model in loaded_now), model

    @invariant()
    def the_backend_holds_exactly_what_the_cache_shows(self) -> None:
        """With no worker job queued (no unload or late load in flight), memory is all accounted for."""
        if self.jobs.pending:
            return
        loaded = self.h.cache.snapshot().loaded
        assert sorted(self.h.backend.live_ids()) == sorted(m.id for m in loaded)
        assert len(self.h.backend.live) <= MAX_MODELS
        assert self.h.memory.total == sum(m.footprint_bytes for m in loaded) <= BUDGET

    @invariant()
    def snapshot_agrees_with_the_requests(self) -> None:
        snapshot = self.h.cache.snapshot()
        waiting = sum(1 for r in self.requests if r.waiting)
        assert snapshot.waiting_requests == waiting + len(self.outside)
        holding = Counter(r.lease.spec.id for r in self.requests if r.holding and r.lease is not None)
        for model in SIZES:
            state = snapshot.get(model)
            assert (state.in_use if state else 0) == holding[model], model
            if state is not None and state.idle_seconds is not None:
                assert state.idle_seconds >= 0
                assert state.in_use == 0

    @invariant()
    def the_table_holds_exactly_the_live_entries(self) -> None:
        cache = self.h.cache
        table = cache._table
        entries = list(table.values())
        assert len(entries) == len(table) == len({e.spec.id for e in entries})
        snapshot = {m.id: m for m in cache.snapshot().models}
        assert set(snapshot) == {e.spec.id for e in entries}
        for entry in entries:
            assert entry.state in LIVE, entry
            assert table.get(entry.spec.id) is entry
            state = snapshot[entry.spec.id]
            assert state.loading == (entry.state in (EntryState.ADMITTING, EntryState.LOADING)), entry
            assert state.loaded == (entry.state in (EntryState.LOADED, EntryState.EVICTING)), entry
            assert (entry.lease is not None) == (entry.state is EntryState.LOADED), entry
            assert entry.admitted == (entry.state is not EntryState.ADMITTING), entry
            if entry.state is not EntryState.LOADED:
                assert entry.refs == 0 or entry.state is EntryState.EVICTING, entry
            if entry.state is EntryState.EVICTING:
                assert entry.evicted is not None
                assert entry.deadline is None
            if entry.state is EntryState.ADMITTING:
                assert entry.pending > 0, f"{entry}: a load nobody waits for was not abandoned"

    @invariant()
    def the_room_queue_and_the_hold_agree_with_the_table(self) -> None:
        admission = self.h.cache._admission
        queue = admission.queue
        assert len(queue) == len(set(map(id, queue)))
        for entry in queue:
            assert entry.state is EntryState.ADMITTING, entry
            assert entry in self.h.cache._table, entry
        if not queue:
            assert admission.held == frozenset()
        for model in admission.held:
            entry = self.h.cache._table.get(model)
            assert entry is not None, model
            assert entry.state in (EntryState.LOADED, EntryState.EVICTING), model

    @invariant()
    def no_background_task_failed(self) -> None:
        assert self.failures == [], self.failures

    # ------------------------------------------------------------ the end

    def teardown(self) -> None:
        try:
            while self.outside:
                self.outside.pop().__exit__(None, None, None)
            for request in self.requests:
                request.release.set()
            closing = self.loop.create_task(self.h.cache.close())
            self.tasks.append(closing)
            for _ in range(100):
                self._settle((*EXPECTED, CacheClosed))
                if closing.done() and not self.jobs.pending:
                    break
                self.jobs.run_all()
            assert closing.done()
            assert not self.jobs.pending
            assert self.h.backend.live == []
            assert self.h.memory.total == 0
            assert self.h.cache.snapshot().models == ()
            loads = Counter(e.model for e in self.h.events.of(Loaded))
            assert loads == Counter(e.model for e in self.h.events.of(Evicted))
            assert all(t.done() for t in self.tasks + self.unloads)
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:  # only after a failure: don't bury it under "Task was destroyed"
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending))
            self.loop.close()


CacheMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_state_machine = CacheMachine.TestCase
