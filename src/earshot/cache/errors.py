"""Errors the cache raises. The API layer maps each to an OpenAI-style error with a status code."""

from __future__ import annotations


class CacheError(Exception):
    """Base of every error the cache raises on purpose."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.model = model


class UnknownModel(CacheError):
    """The id is not in the catalog (API: 404)."""


class ModelLoadError(CacheError):
    """The load failed (bad files, backend error, out of memory). The next request retries (API: 503)."""


class ModelLoadTimeout(ModelLoadError):
    """The load took longer than `model_load_timeout` (API: 503 + Retry-After)."""


class CacheFull(CacheError):
    """No room could be made for the model within `model_load_timeout`: every loaded model is in use,
    or the model alone is larger than the memory budget (API: 503 + Retry-After)."""


class CacheBusy(CacheError):
    """`max_waiting_requests` requests are already waiting in the cache (API: 503 + Retry-After, at once)."""


class CacheClosed(CacheError):
    """The cache is shutting down and admits nothing new (API: 503)."""
