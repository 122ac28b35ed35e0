"""Typed events the cache publishes for every decision it makes.

Metrics, logs, traces and `/api/events` are observers of these; none of them keeps a second copy
of the cache's state. Observers are called synchronously, in the task that caused the event, so
the request's trace and log context are current. An observer that raises is logged by the cache
and never breaks a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class EvictionReason(StrEnum):
    IDLE = "idle"
    CAPACITY = "capacity"
    MEMORY = "memory"
    MANUAL = "manual"
    SHUTDOWN = "shutdown"


class LoadFailureKind(StrEnum):
    """The `outcome` label of a failed load.

    `failure` (bad files, backend error, out of memory) or `timeout`.
    """

    FAILURE = "failure"
    TIMEOUT = "timeout"


@dataclass(frozen=True, kw_only=True)
class CacheEvent:
    model: str
    task: str
    at: float  # wall-clock seconds since the epoch

    @property
    def kind(self) -> str:
        """Stable snake_case name of the event, used as `event=` in logs and `/api/events`."""
        return _KINDS[type(self)]


@dataclass(frozen=True, kw_only=True)
class Hit(CacheEvent):
    """The model was loaded already."""


@dataclass(frozen=True, kw_only=True)
class Miss(CacheEvent):
    """This request started the load of the model."""


@dataclass(frozen=True, kw_only=True)
class Coalesced(CacheEvent):
    """A load of the model was already under way; this request waits for that one load."""


@dataclass(frozen=True, kw_only=True)
class DownloadStarted(CacheEvent):
    """The backend's `fetch` (the download phase before a load) started."""


@dataclass(frozen=True, kw_only=True)
class Downloaded(CacheEvent):
    """The download phase ended well; the load follows (LoadStarted, once there is room)."""

    duration_s: float


@dataclass(frozen=True, kw_only=True)
class LoadStarted(CacheEvent):
    reload: bool  # evicted less than thrash_window_seconds ago


@dataclass(frozen=True, kw_only=True)
class Loaded(CacheEvent):
    duration_s: float
    footprint_bytes: int  # total over devices
    footprint: Mapping[str, int] = field(default_factory=dict)  # per device: {"cpu": ..., "cuda:0": ...}
    measured: bool = True  # False when the measurement was unusable and the estimate stands in
    reload: bool = False
    # This load's own reading (bytes, all devices; 0: unusable). `footprint_bytes` is the model's
    # figure: the median of its last readings (earshot.cache.footprint).
    reading_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class LoadFailed(CacheEvent):
    duration_s: float
    error_kind: LoadFailureKind
    message: str
    out_of_memory: bool = False
    phase: str = "load"  # "download" when the download phase failed (duration_s: from its start)


@dataclass(frozen=True, kw_only=True)
class Evicted(CacheEvent):
    reason: EvictionReason
    idle_s: float  # time since the last reference went (0 when evicted while just released)
    resident_s: float  # loaded-to-evicted
    footprint_bytes: int
    # Process memory (RSS + GPU) given back across the unload, measured after returning memory that
    # was free already (request buffers) to the OS first, so that it is not counted; memory other
    # threads free during the unload still is. May be <= 0. See workers.unload_released.
    released_bytes: int


_KINDS: dict[type[CacheEvent], str] = {
    Hit: "cache_hit",
    Miss: "cache_miss",
    Coalesced: "cache_coalesced",
    DownloadStarted: "model_download_started",
    Downloaded: "model_downloaded",
    LoadStarted: "model_load_started",
    Loaded: "model_loaded",
    LoadFailed: "model_load_failed",
    Evicted: "model_evicted",
}


class Observer(Protocol):
    """Receives every cache event, synchronously. Must be quick; must not call back into the cache."""

    def __call__(self, event: CacheEvent) -> None: ...
