"""The `Inference` protocol: what the API (and realtime sessions) may ask of the models.

Every method takes a catalog id (aliases already resolved by the caller through the catalog) and
raises the errors of `earshot.inference.errors`: unknown model, load failure or timeout, cache
full or busy (503 + Retry-After), shutting down, and `RequestError`s for what the model cannot do
as asked (400). Audio in is mono float32 PCM at `TRANSCRIPTION_SAMPLE_RATE`; audio out is mono
float32 PCM at the stream's or result's `sample_rate`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from earshot.options import SpeechOptions, TranscribeOptions
from earshot.types import Segment, Transcript

PCM = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Speech:
    samples: PCM
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


class TranscriptStream(Protocol):
    """Segments as they are decoded. The model is held (and the inference slot taken) until the
    stream ends or is closed; closing it early (client gone) stops decoding at the next segment."""

    language: str
    duration: float

    def __aiter__(self) -> AsyncIterator[Segment]: ...

    async def aclose(self) -> None: ...


class SpeechStream(Protocol):
    """Audio as it is synthesized, a sentence (or a batch of them) at a time; held like a
    TranscriptStream."""

    sample_rate: int

    def __aiter__(self) -> AsyncIterator[PCM]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What `load` did: "hit" (loaded already), "miss" (this call loaded it), "coalesced"."""

    model: str
    outcome: Literal["hit", "miss", "coalesced"]


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model in memory (or loading), as `/api/ps` shows it. Times are wall clock seconds."""

    id: str
    task: str
    loaded: bool
    loading: bool
    loading_since: float | None
    loaded_at: float | None
    last_used_at: float | None
    idle_seconds: float | None
    expires_at: float | None
    in_use: int
    pinned: bool
    size_bytes: int
    size_measured: bool
    memory: dict[str, int]  # bytes per device ("cpu", "cuda:0")
    waiting: int
    keep_alive: float | None
    phase: str | None = None  # while loading: "downloading" or "loading"
    worker: str | None = None  # in a fleet: the worker holding it


class Inference(Protocol):
    """Run models: the API's only way to them."""

    async def transcribe(self, model_id: str, audio: PCM, options: TranscribeOptions) -> Transcript:
        """Transcribe (or translate) the whole input."""
        ...

    async def transcribe_stream(
        self, model_id: str, audio: PCM, options: TranscribeOptions
    ) -> TranscriptStream:
        """Start a transcription: returns once the model is held and the options are checked
        against it (errors raise here, before a response starts); segments follow."""
        ...

    async def synthesize(self, model_id: str, text: str, options: SpeechOptions) -> Speech:
        """Synthesize the whole text."""
        ...

    async def synthesize_stream(self, model_id: str, text: str, options: SpeechOptions) -> SpeechStream:
        """Start a synthesis: returns once the model is held and the voice resolved; the first
        piece is synthesized before it returns, so what fails on it is an error here."""
        ...

    async def voices(self, model_id: str) -> Sequence[str]:
        """The voices of a speech model, read from its files: never loads a model."""
        ...

    def hold(self, model_id: str, keep_alive: float | None = None) -> AbstractAsyncContextManager[None]:
        """Keep the model loaded for the block (a realtime session): it counts as in use and is
        never evicted meanwhile; `transcribe` calls inside are cache hits."""
        ...

    async def load(
        self, model_id: str, *, keep_alive: float | None = None, pin: bool | None = None
    ) -> LoadResult:
        """Load (or touch) a model and release it at once: the preload API. `pin` True/False
        pins/unpins it, None leaves the pin as is."""
        ...

    async def unload(self, model_id: str) -> Literal["unloaded", "scheduled", "not_loaded"]:
        """Unload now if idle, else when its last reference goes."""
        ...

    async def status(self) -> Sequence[ModelStatus]:
        """The models in memory or loading, most recently used first (async: a fleet asks its
        workers)."""
        ...

    def waiting_requests(self) -> int:
        """Requests waiting right now (for a load, for room, or for an inference slot); in a fleet,
        as of the last `status()`."""
        ...

    @property
    def ready(self) -> bool:
        """False while preloads are still running."""
        ...

    def describe(self) -> dict[str, Any]:
        """Limits in force (max_models, memory_budget_bytes, ...) for `/api/ps` and the console."""
        ...


class RemoteInference(Inference, Protocol):
    """An inference service whose models run elsewhere (the fleet's workers), handed to
    `create_app(inference=...)` in place of a local cache; the app's lifespan starts and closes it."""

    async def start(self, *, preload: Sequence[str], publish: Callable[[dict[str, Any]], None]) -> None:
        """Begin: relay the workers' cache events to `publish` (the app's event log, /api/events)
        and load the `preload` models (catalog ids) on the workers."""
        ...

    async def close(self) -> None:
        """Stop relaying; leave the workers as they are (they are not this app's)."""
        ...
