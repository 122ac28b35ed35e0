"""Errors the backends raise for requests a loaded model cannot serve. Each is a ValueError: the request
is at fault, not the server (API: 400). Out-of-memory is `earshot.cache.protocol.BackendOutOfMemory`; limits of the
options themselves (speed, temperature) are checked by `earshot.options`."""

from __future__ import annotations

from collections.abc import Iterable

from earshot.types import RequestError


class BackendRequestError(RequestError):
    """Base of the request errors a backend raises: the API answers 400 with the message."""


class UnsupportedTask(BackendRequestError):
    """The model cannot do what was asked (translation with an English-only Whisper model)."""

    param = "model"


class UnsupportedLanguage(BackendRequestError):
    """The language is not one the model knows (or the model is English-only)."""

    param = "language"


class UnknownVoice(BackendRequestError):
    """The voice is neither one of the model's voices nor an OpenAI voice name."""

    param = "voice"

    def __init__(self, voice: str, available: Iterable[str]) -> None:
        self.voice = voice
        self.available = sorted(available)
        super().__init__(f"unknown voice {voice!r}; available voices: {', '.join(self.available)}")


class InvalidInput(BackendRequestError):
    """Input a model cannot process (empty text, an empty audio array...)."""

    param = "input"


class ModelUnloaded(RuntimeError):
    """The handle was used after the cache unloaded it (a bug in the caller: it held no reference)."""
