"""What a request asks of a model, as frozen option objects that check their own limits.

Each limit is defined once, here: the API builds these from a request (an invalid value raises
`InvalidOption`, a `RequestError`, which the API answers with 400), the inference service passes
them on unchanged (to a worker of the fleet too), and the backends read them. What only a loaded
model can tell (is the language one it knows? can it translate? is the voice one of its own?) the
backend checks and raises as a `RequestError` of its own.

Stdlib only (the bottom layer, beside `earshot.types`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from earshot.types import RequestError

__all__ = [
    "MAX_KEEP_ALIVE",
    "MAX_SPEED",
    "MIN_SPEED",
    "TRANSCRIPTION_SAMPLE_RATE",
    "InvalidOption",
    "SpeechOptions",
    "TranscribeOptions",
    "check_keep_alive",
]

#: Whisper takes 16 kHz mono float32 PCM: the API decodes uploads (and realtime audio) to this rate.
TRANSCRIPTION_SAMPLE_RATE = 16_000
MIN_SPEED = 0.25
MAX_SPEED = 4.0
MIN_TEMPERATURE = 0.0
MAX_TEMPERATURE = 1.0
MAX_KEEP_ALIVE = 10 * 365 * 86400.0  # seconds; -1 is the way to say "never unload"

WhisperTask = Literal["transcribe", "translate"]


class InvalidOption(RequestError):
    """An option outside its limits (API: 400 naming the field)."""


def check_keep_alive(value: float | None) -> None:
    """-1 (never unload), 0 (unload now) or finite seconds up to MAX_KEEP_ALIVE. NaN compares false
    with everything (it would pass `< 0` and mean "never" by accident); inf and huge values have no
    representable expiry time (`/api/ps` expires_at)."""
    if value is None or value == -1:
        return
    if not math.isfinite(value) or not 0 <= value <= MAX_KEEP_ALIVE:
        raise InvalidOption(
            f"keep_alive must be -1 (never unload), 0 (unload now) or seconds from 0 to {MAX_KEEP_ALIVE:.0f}",
            param="keep_alive",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TranscribeOptions:
    """A transcription (or translation into English) as a request asked for it.

    temperature: 0 uses faster-whisper's fallback schedule (OpenAI: "the model will use log
    probability to automatically increase the temperature"); otherwise that one temperature.
    keep_alive: the idle timeout after this request (see `check_keep_alive`); None: the model's.
    """

    task: WhisperTask = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False
    vad_filter: bool = False
    hotwords: str | None = None
    keep_alive: float | None = None

    def __post_init__(self) -> None:
        if self.task not in ("transcribe", "translate"):
            raise InvalidOption(f"unknown task {self.task!r}; expected 'transcribe' or 'translate'")
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:  # NaN fails too
            raise InvalidOption(
                f"temperature must be between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}",
                param="temperature",
            )
        check_keep_alive(self.keep_alive)
        if self.language is not None:
            object.__setattr__(self, "language", self.language.strip().lower() or None)
        for name in ("prompt", "hotwords"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)


@dataclass(frozen=True, kw_only=True, slots=True)
class SpeechOptions:
    """A synthesis as a request asked for it. `voice` None: the model's voice for OpenAI's "alloy";
    `lang` None: the model's language (Kokoro/espeak, en-us by default)."""

    voice: str | None = None
    speed: float = 1.0
    lang: str | None = None
    keep_alive: float | None = None

    def __post_init__(self) -> None:
        if not MIN_SPEED <= self.speed <= MAX_SPEED:  # NaN fails too
            raise InvalidOption(f"speed must be between {MIN_SPEED} and {MAX_SPEED}", param="speed")
        check_keep_alive(self.keep_alive)
