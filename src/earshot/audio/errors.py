"""Errors of audio decoding and encoding. Each is a ValueError: the client sent something unusable."""

from __future__ import annotations


class AudioError(ValueError):
    """Base of the audio errors."""


class AudioDecodeError(AudioError):
    """The input is not audio PyAV can decode (or holds no audio, or no samples) (API: 400)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"could not decode audio: {reason}")
        self.reason = reason


class AudioTooLong(AudioError):
    """More than `max_seconds` of audio were decoded (API: 413 or 400). Decoding stopped there."""

    def __init__(self, max_seconds: float) -> None:
        super().__init__(f"audio is longer than the limit of {max_seconds:g} seconds")
        self.max_seconds = max_seconds
