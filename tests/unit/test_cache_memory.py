"""Unloads really free: the cache keeps no reference to an unloaded handle, gc + malloc_trim run
in the worker thread, and the bytes given back are measured."""

from __future__ import annotations

import gc
import platform
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import pytest

from earshot.cache import memory
from earshot.cache.events import Evicted, Loaded
from earshot.cache.manager import ModelCache
from earshot.cache.protocol import ModelSpec, Task, rss_probe
from earshot.cache.state import CacheConfig
from earshot.cache.workers import estimate_footprint, load_measured, read_probe, unload_released
from tests.support.fakes import EventRecorder, FakeBackend, FakeClock, FakeHandle, FakeMemory, make_spec


class _Model:
    """A loaded model that nothing but its holders references."""

    def __init__(self) -> None:
        self.weights = bytearray(4096)
        self.me = self  # a reference cycle, like real models often have: only gc frees it


class _ForgetfulBackend:
    """A backend that keeps no reference to what it loaded (FakeBackend records its handles)."""

    def __init__(self) -> None:
        self.unloaded = 0

    def load(self, spec: ModelSpec) -> _Model:
        return _Model()

    def unload(self, handle: Any) -> None:
        self.unloaded += 1

    def footprint(self, spec: ModelSpec) -> int:
        return 4096


def test_release_memory_collects_garbage_and_trims() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    probe = Cycle()
    ref = weakref.ref(probe)
    del probe
    memory.release_memory()
    assert ref() is None
    assert isinstance(memory.malloc_trim(), bool)


def test_rss_probe_reads_this_process() -> None:
    reading = rss_probe()
    assert reading.get("cpu", 0) > 0


def test_load_measured_returns_positive_deltas_per_device() -> None:
    mem = FakeMemory()
    mem.add("cuda:0", 1000)
    backend = FakeBackend(footprints={"a": 300}, device="cuda:0", memory=mem)
    handle, footprint = load_measured(backend, make_spec("a"), mem)
    assert isinstance(handle, FakeHandle)
    assert footprint == {"cuda:0": 300}


def test_load_measured_drops_devices_that_shrank() -> None:
    readings = iter([{"cpu": 500, "cuda:0": 10}, {"cpu": 400, "cuda:0": 60}])

    def probe() -> Mapping[str, int]:
        return next(readings)

    _, footprint = load_measured(FakeBackend(track_memory=False), make_spec("a"), probe)
    assert footprint == {"cuda:0": 50}


def test_a_broken_probe_reads_as_nothing() -> None:
    def probe() -> Mapping[str, int]:
        raise OSError("no /proc")

    assert read_probe(probe) == {}
    _, footprint = load_measured(FakeBackend(), make_spec("a"), probe)
    assert footprint == {}


def test_estimate_falls_back_to_size_bytes() -> None:
    class Broken(FakeBackend):
        def footprint(self, spec: ModelSpec) -> int:
            raise RuntimeError("no files")

    spec = make_spec("a", size_bytes=777)
    assert estimate_footprint(Broken(), spec) == 777
    assert estimate_footprint(FakeBackend(estimates={"a": 0}), spec) == 777
    assert estimate_footprint(FakeBackend(estimates={"a": 5}), spec) == 5


def test_unload_released_empties_the_box_before_releasing_memory() -> None:
    backend = _ForgetfulBackend()
    readings = iter([{"cpu": 9000}, {"cpu": 5000}])
    handle = backend.load(make_spec("a"))
    ref = weakref.ref(handle)
    box: list[Any] = [handle]
    del handle
    freed_during_release: list[bool] = []

    def release() -> None:
        gc.collect()
        freed_during_release.append(ref() is None)

    released = unload_released(backend, box, lambda: next(readings), release)
    assert box == []
    assert backend.unloaded == 1
    # The release before the unload saw the handle alive; after it, nothing kept the handle alive.
    assert freed_during_release == [False, True]
    assert released == 4000


def test_unload_released_survives_a_failing_backend_unload() -> None:
    class Broken(FakeBackend):
        def unload(self, handle: FakeHandle) -> None:
            raise RuntimeError("driver error")

    calls: list[str] = []
    assert unload_released(Broken(), [object()], FakeMemory(), lambda: calls.append("released")) == 0
    assert calls == ["released", "released"]  # before (others' free memory) and after the unload


async def test_an_evicted_handle_is_freed_and_released_in_a_worker_thread() -> None:
    backend = _ForgetfulBackend()
    events = EventRecorder()
    threads: list[str] = []
    freed_in_release: list[bool] = []
    refs: list[weakref.ref[object]] = []

    def release() -> None:
        threads.append(threading.current_thread().name)
        memory.release_memory()
        if refs:  # the releases around the load run before there is a handle to watch
            freed_in_release.append(refs[0]() is None)

    cache = ModelCache(
        lambda model_id: make_spec(model_id),
        {Task.TRANSCRIPTION.value: backend},
        CacheConfig(idle_timeout=-1),
        observers=[events],
        clock=FakeClock(),
        memory_probe=lambda: {},  # unusable: the estimate (4096) stands in
        release_memory=release,
    )
    lease = await cache.load("a")
    assert len(threads) == 2  # released before and after the load, to measure it
    refs.append(weakref.ref(lease.handle))
    del lease
    assert await cache.unload("a") == "unloaded"
    # The cache dropped every reference before gc ran in the worker: the model was freed there
    # (by the release after the unload; the one before it returns memory others freed).
    assert freed_in_release == [False, True]
    assert threads
    assert threads[0] != threading.current_thread().name
    assert backend.unloaded == 1
    evicted = events.of(Evicted, "a")[0]
    assert evicted.footprint_bytes == 4096
    assert evicted.released_bytes == 0


async def test_default_release_memory_and_probe_are_used_when_none_given() -> None:
    backend = FakeBackend()
    cache = ModelCache(
        lambda model_id: ModelSpec(id=model_id, task=Task.TRANSCRIPTION, source="local"),
        {"transcription": backend},
        CacheConfig(),
    )
    await cache.load("a")
    assert await cache.unload("a") == "unloaded"
    assert backend.unloads == 1
    await cache.close()


class FakeMallopt:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


def test_tune_allocator_limits_glibc_to_two_arenas(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMallopt()
    monkeypatch.setattr(memory, "_libc_function", lambda name, argtypes: fake if name == "mallopt" else None)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert memory.tune_allocator() == {"MALLOC_ARENA_MAX": 2}
    assert fake.calls == [(memory.M_ARENA_MAX, 2)]


def test_tune_allocator_leaves_what_the_environment_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMallopt()
    monkeypatch.setattr(memory, "_libc_function", lambda name, argtypes: fake if name == "mallopt" else None)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.tune_allocator() == {}
    assert fake.calls == []


def test_tune_allocator_without_glibc_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_libc_function", lambda name, argtypes: None)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert memory.tune_allocator() == {}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_allocator_on_this_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert memory.tune_allocator() == {"MALLOC_ARENA_MAX": 2}  # the real mallopt took it


async def test_released_bytes_leave_out_memory_others_freed_before_the_unload() -> None:
    """Issue 12 point 7: an eviction read 277.5 MiB released for a 67.5 MiB model, because request
    buffers freed earlier went back to the OS in the same malloc_trim. Those are returned first now."""
    backend = FakeBackend(footprint=100)
    events = EventRecorder()
    cache = ModelCache(
        lambda model_id: make_spec(model_id),
        {Task.TRANSCRIPTION.value: backend},
        CacheConfig(idle_timeout=-1),
        observers=[events],
        clock=FakeClock(),
        memory_probe=backend.memory,
        release_memory=backend.memory.trim,
    )
    await cache.load("a")
    backend.memory.retain(500)  # requests ran and freed their buffers; the allocator kept them
    assert await cache.unload("a") == "unloaded"
    evicted = events.of(Evicted, "a")[0]
    assert evicted.footprint_bytes == 100
    assert evicted.released_bytes == 100  # not 600
    assert backend.memory.total == 0
    await cache.close()


def test_load_measured_gives_freed_memory_back_before_each_reading() -> None:
    """Memory the allocator kept from others before the load, and the load's own temporaries, are
    returned before the readings: neither is counted as (or hides) the model's."""
    mem = FakeMemory()

    class Untidy(FakeBackend):
        def load(self, spec: ModelSpec) -> FakeHandle:
            handle = super().load(spec)
            mem.retain(70)  # the load read its file into a buffer and freed it; the allocator kept it
            return handle

    mem.retain(500)  # request buffers freed before the load: a load reusing them would grow nothing
    _, footprint = load_measured(Untidy(footprints={"a": 300}, memory=mem), make_spec("a"), mem, mem.trim)
    assert footprint == {"cpu": 300}
    _, unreleased = load_measured(Untidy(footprints={"b": 300}, memory=mem), make_spec("b"), mem)
    assert unreleased == {"cpu": 370}  # what it read without the releases


async def test_a_models_footprint_is_the_median_of_its_last_loads() -> None:
    """One load's reading is noisy under traffic (others allocate and free meanwhile): the footprint in
    force, for budgets and /api/ps, is the lower median of the model's last readings."""
    backend = FakeBackend(footprints={"a": 100})
    events = EventRecorder()
    cache = ModelCache(
        lambda model_id: make_spec(model_id),
        {Task.TRANSCRIPTION.value: backend},
        CacheConfig(idle_timeout=-1),
        observers=[events],
        clock=FakeClock(),
        memory_probe=backend.memory,
        release_memory=backend.memory.trim,
    )
    for reading in (100, 100, 40, 160):
        backend.footprints["a"] = reading
        await cache.load("a")
        assert await cache.unload("a") == "unloaded"
    loaded = events.of(Loaded, "a")
    assert [e.reading_bytes for e in loaded] == [100, 100, 40, 160]
    assert [e.footprint_bytes for e in loaded] == [100, 100, 100, 100]
    backend.footprints["a"] = 41
    await cache.load("a")
    [state] = cache.snapshot().models
    assert (state.footprint_bytes, dict(state.footprint)) == (100, {"cpu": 100})  # [40, 41, 100, 100, 160]
    await cache.close()
