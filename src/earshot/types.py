"""Types every layer shares: what a model is (`ModelSpec`, `Task`), what a transcription returns
(`Transcript`, `Segment`, `Word`), and the base of the errors a request causes (`RequestError`).

Stdlib only: the cache core, the backends, the inference service and the API all import this
module, and it imports nothing of theirs (the bottom layer of the import-linter contract).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = ["ModelSpec", "RequestError", "Segment", "Task", "Transcript", "Word"]


class Task(StrEnum):
    """What a model does. The values are the `task` label of every metric."""

    TRANSCRIPTION = "transcription"
    SPEECH = "speech"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the catalog: everything needed to load it, nothing loaded yet.

    `id` is the canonical catalog id (aliases are resolved before the cache sees a request), so it
    is safe as a metric label. `path` is a local directory (already checked to stay inside
    `models_dir`, or given explicitly by the operator); `repo_id` a Hugging Face repo to fetch
    when `path` is None. `size_bytes` is the footprint estimate from file sizes, used for the
    memory budget until the first load has measured the real one.
    """

    id: str
    task: Task
    source: str  # "local" | "config" | "hf"
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    pin: bool = False
    idle_timeout: float | None = None  # per-model override of model_idle_timeout (-1, 0, N seconds)
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass(frozen=True, slots=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None
    seek: int = 0


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str  # the segments' text joined, stripped
    language: str  # ISO-639-1 code (detected, or the one requested); "en" for English-only models
    duration: float  # seconds of input audio
    segments: list[Segment]
    language_probability: float = 1.0


class RequestError(ValueError):
    """A request asked for something that cannot be served as asked (a value out of range, a
    language the model lacks, an unknown voice): the client is at fault, the API answers 400 with
    the message and `param`. Backends and option types raise subclasses of it."""

    param: str | None = None
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code
