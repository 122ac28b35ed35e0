"""The cache's configuration and the read-only picture of its state (`snapshot()`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheConfig:
    """Cache limits, built from the settings by the application.

    idle_timeout: seconds an unreferenced model stays loaded; -1 never expires, 0 unloads as soon
        as the last reference goes.
    max_models: loaded models at most (None: no limit).
    memory_budget_bytes: sum of model footprints at most (None: no limit).
    load_timeout: seconds a load may take, and a request may wait for room, before it fails.
    download_timeout: seconds the download phase (`backend.fetch`, for backends that have it) may
        take before the load fails; `load_timeout` does not include it.
    thrash_window: a load of a model evicted less than this many seconds ago is a reload.
    max_waiting: requests waiting (for a load, for room, for an unload, or outside the cache through
        `ModelCache.waiting`) at most; more fail at once.
    pin_preloaded: preloaded models are pinned (exempt from idle eviction).
    shutdown_grace: seconds `close()` waits for requests in flight before unloading anyway.
    """

    idle_timeout: float = 300.0
    max_models: int | None = None
    memory_budget_bytes: int | None = None
    load_timeout: float = 300.0
    thrash_window: float = 300.0
    max_waiting: int = 256
    pin_preloaded: bool = True
    shutdown_grace: float = 30.0
    download_timeout: float = 3600.0


@dataclass(frozen=True)
class ModelState:
    """One catalog model the cache knows about right now (loaded, loading, or both not)."""

    id: str
    task: str
    loaded: bool
    loading: bool
    loading_since: float | None  # wall time the load in progress started
    loaded_at: float | None  # wall time
    last_used_at: float | None  # wall time the last reference was released (or acquired)
    idle_seconds: float | None  # None while in use or not loaded
    expires_at: float | None  # wall time of idle eviction; None: in use, pinned, never, or not loaded
    in_use: int  # references held right now
    pinned: bool
    footprint: Mapping[str, int] = field(default_factory=dict)  # bytes per device ("cpu", "cuda:0")
    footprint_bytes: int = 0  # total; the estimate while not yet measured
    footprint_measured: bool = False
    waiting: int = 0  # requests waiting for this model (its load, room, its unload, or via `waiting()`)
    keep_alive: float | None = None  # idle timeout in force for this model (after overrides)
    phase: str | None = None  # while loading: "downloading", "waiting" (for room), "loading"


@dataclass(frozen=True)
class CacheSnapshot:
    at: float  # wall time the snapshot was taken
    models: tuple[ModelState, ...]  # loaded or loading models, most recently used first
    waiting_requests: int  # requests waiting (for a load, room, an unload, or counted by `waiting()`)
    config: CacheConfig

    @property
    def loads_in_progress(self) -> int:
        return sum(1 for m in self.models if m.loading)

    @property
    def loaded(self) -> tuple[ModelState, ...]:
        return tuple(m for m in self.models if m.loaded)

    def get(self, model_id: str) -> ModelState | None:
        return next((m for m in self.models if m.id == model_id), None)
