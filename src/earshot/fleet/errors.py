"""earshot's errors across the Ray boundary.

A worker's method raises `Remote(...)` in place of an earshot error: a plain exception whose one
argument is a dict of strings, so it pickles whatever the original's constructor looks like
(`UnknownVoice(voice, available)` would not unpickle). The gateway turns it back into an error of
the class the API maps (`rebuild`), with the same message, model, param and code, so a fleet
answers with the status, code and message the single server gives.

A worker that dies under a request (its process killed, out of memory) surfaces at the gateway as
one of Ray's actor errors; `WorkerLost` (503 + Retry-After, code `busy`) is what the client gets
once the gateway's one retry has failed too.
"""

from __future__ import annotations

from typing import Any

from earshot.inference.errors import (
    CacheBusy,
    CacheClosed,
    CacheError,
    CacheFull,
    ModelLoadError,
    ModelLoadTimeout,
    RequestError,
    UnknownModel,
)
from earshot.models.errors import (
    CatalogFull,
    HubModelNotFound,
    HubModelsDisabled,
    HubUnreachable,
    ModelResolutionError,
    NotAHubId,
    NotServable,
)

# Most specific first: the first class an error is an instance of names it.
_CACHE_ERRORS: tuple[type[CacheError], ...] = (
    UnknownModel,
    ModelLoadTimeout,
    ModelLoadError,
    CacheFull,
    CacheBusy,
    CacheClosed,
    CacheError,
)
_BY_NAME: dict[str, type[CacheError]] = {cls.__name__: cls for cls in _CACHE_ERRORS}
_RESOLUTION: dict[str, type[ModelResolutionError]] = {
    cls.__name__: cls
    for cls in (
        NotAHubId,
        HubModelNotFound,
        NotServable,
        HubUnreachable,
        CatalogFull,
        HubModelsDisabled,
        ModelResolutionError,
    )
}


class WorkerLost(CacheBusy):
    """The worker serving the request went away (and the retry found none): 503 + Retry-After."""


class Remote(Exception):
    """An earshot error raised in a worker, in a form that pickles."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info)
        self.info = info

    def __str__(self) -> str:
        return str(self.info.get("message", ""))

    def rebuild(self) -> Exception:
        """The earshot error this stands for."""
        info = self.info
        kind, message = info.get("kind"), str(info.get("message", ""))
        if kind == "request":
            return RequestError(message, param=info.get("param"), code=info.get("code"))
        if kind in _RESOLUTION:
            return _RESOLUTION[str(kind)](message, model=str(info.get("model") or ""))
        cls = _BY_NAME.get(str(kind), CacheError)
        return cls(message, model=info.get("model"))


def to_remote(exc: BaseException) -> Remote | None:
    """The `Remote` for an earshot error (None for anything else: a bug, left as it is)."""
    if isinstance(exc, CacheError):
        kind = next(cls.__name__ for cls in _CACHE_ERRORS if isinstance(exc, cls))
        return Remote({"kind": kind, "message": exc.message, "model": exc.model})
    if isinstance(exc, RequestError):
        code = exc.code or getattr(type(exc), "code", None)
        return Remote({"kind": "request", "message": exc.message, "param": exc.param, "code": code})
    if isinstance(exc, ModelResolutionError):
        kind = type(exc).__name__ if type(exc).__name__ in _RESOLUTION else "ModelResolutionError"
        return Remote({"kind": kind, "message": exc.message, "model": exc.model})
    return None
