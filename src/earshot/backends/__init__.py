"""The model backends: faster-whisper for speech-to-text, kokoro-onnx for text-to-speech.

Each implements the cache's `Backend` protocol (blocking load/unload/footprint, run in worker
threads). Importing this package is cheap: the model libraries are imported when a model loads.
"""

from __future__ import annotations

from earshot.backends.errors import (
    BackendRequestError,
    InvalidInput,
    ModelUnloaded,
    UnknownVoice,
    UnsupportedLanguage,
    UnsupportedTask,
)
from earshot.backends.kokoro import KokoroBackend, KokoroHandle
from earshot.backends.whisper import SegmentStream, WhisperBackend, WhisperHandle
from earshot.cache.protocol import Backend, BackendOutOfMemory
from earshot.types import Segment, Task, Transcript, Word

__all__ = [
    "Backend",
    "BackendOutOfMemory",
    "BackendRequestError",
    "InvalidInput",
    "KokoroBackend",
    "KokoroHandle",
    "ModelUnloaded",
    "Segment",
    "SegmentStream",
    "Transcript",
    "UnknownVoice",
    "UnsupportedLanguage",
    "UnsupportedTask",
    "WhisperBackend",
    "WhisperHandle",
    "Word",
    "default_backends",
]


def default_backends(
    device: str = "auto",
    compute_type: str = "auto",
    *,
    cpu_threads: int = 0,
    default_lang: str = "en-us",
) -> dict[str, Backend]:
    """The real backends, keyed by `Task` value ("transcription", "speech")."""
    return {
        Task.TRANSCRIPTION.value: WhisperBackend(
            device=device, compute_type=compute_type, cpu_threads=cpu_threads
        ),
        Task.SPEECH.value: KokoroBackend(device=device, default_lang=default_lang, cpu_threads=cpu_threads),
    }
