"""The errors an `Inference` raises, in one place for the API to map to statuses.

The cache's errors are re-exported here: the API reaches them through the inference service, not
the cache package. A remote implementation (the fleet) raises the same classes.
"""

from __future__ import annotations

from earshot.cache.errors import (
    CacheBusy,
    CacheClosed,
    CacheError,
    CacheFull,
    ModelLoadError,
    ModelLoadTimeout,
    UnknownModel,
)
from earshot.types import RequestError

__all__ = [
    "CacheBusy",
    "CacheClosed",
    "CacheError",
    "CacheFull",
    "ModelLoadError",
    "ModelLoadTimeout",
    "RequestError",
    "UnknownModel",
]
