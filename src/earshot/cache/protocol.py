"""What the cache holds and how it talks to the things that load models.

Stdlib only: the cache core is tested with a fake backend and run with real ones, so nothing
here may know about faster-whisper, Kokoro, Litestar or Prometheus.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from earshot.types import ModelSpec, Task

T = TypeVar("T")

__all__ = [
    "Backend",
    "BackendOutOfMemory",
    "Clock",
    "MemoryProbe",
    "ModelSpec",
    "SystemClock",
    "Task",
    "rss_probe",
]


@runtime_checkable
class Backend(Protocol):
    """Loads and unloads models of one task. Every method is blocking and runs in a worker thread."""

    def load(self, spec: ModelSpec) -> Any:
        """Load the model and return a handle to it (whatever the API layer uses to run inference).

        Raise `BackendOutOfMemory` when the failure is an out-of-memory condition, so the cache can
        evict idle models and retry once; any other exception is a plain load failure.
        """
        ...

    def unload(self, handle: Any) -> None:
        """Drop every reference the backend keeps to the handle and free device memory it holds."""
        ...

    def footprint(self, spec: ModelSpec) -> int:
        """Estimated resident bytes of the model before it was ever loaded (from file sizes)."""
        ...


@runtime_checkable
class Fetcher(Protocol):
    """The optional download phase of a backend: a backend with a `fetch` method gets it called
    (in a worker, under `CacheConfig.download_timeout`) before each `load`; one without skips it."""

    def fetch(self, spec: ModelSpec) -> None:
        """Make the files `load(spec)` needs present locally (download them); blocking.

        Called before every load: return quickly when they are there already. Any exception is a
        failed load (its message says download).
        """
        ...


class BlockingRunner(Protocol):
    """Runs the cache's blocking calls (footprint, fetch, load, unload) off the event loop.

    `run` must not cancel `fn` when the awaiting task is cancelled (it cannot: `fn` runs in a
    thread); the cache decides what happens to work that outlives its wait.
    """

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T: ...


class BackendOutOfMemory(Exception):
    """A backend could not load a model for lack of memory (host RAM or GPU)."""


class MemoryProbe(Protocol):
    """Reads this process's memory now, per device: {"cpu": rss_bytes, "cuda:0": bytes, ...}.

    Called from worker threads around each load and unload; the difference is the measured
    footprint (or the memory released). Must be thread-safe and cheap.
    """

    def __call__(self) -> Mapping[str, int]: ...


def rss_probe() -> Mapping[str, int]:
    """Resident set size of this process from /proc (Linux); {} where /proc is absent."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return {}
    import resource

    return {"cpu": resident_pages * resource.getpagesize()}


class Clock(Protocol):
    """Time as the cache sees it. Real by default; tests drive a fake one instead of sleeping."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, durations)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (what `loaded_at`, `last_used_at`, `expires_at` report)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds` of this clock's time (cancellable)."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
