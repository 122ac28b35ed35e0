"""Give memory back to the operating system after a model is unloaded.

Dropping the last reference to a model frees its objects, but CPython's allocator and glibc's
malloc keep the freed pages mapped: the process RSS stays high and the next model may not fit.
`release_memory()` runs a full garbage collection (models often sit in reference cycles) and then
asks glibc to return free heap pages to the OS with `malloc_trim(0)`. Stdlib only; on platforms
without glibc it is just a garbage collection. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger("earshot.cache")

_malloc_trim: Callable[[int], int] | None = None
_looked_up = False
_lookup_lock = threading.Lock()


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def malloc_trim() -> bool:
    """Return free heap memory to the OS (glibc `malloc_trim(0)`). True if any was released."""
    global _malloc_trim, _looked_up
    if not _looked_up:
        with _lookup_lock:
            if not _looked_up:
                _malloc_trim = _find_malloc_trim()
                _looked_up = True
    trim = _malloc_trim
    if trim is None:
        return False
    try:
        return bool(trim(0))
    except Exception:  # pragma: no cover - a broken libc binding must not break an unload
        logger.debug("malloc_trim failed", exc_info=True)
        return False


def release_memory() -> None:
    """Collect garbage (all generations), then trim the C heap. Blocking; run it in a worker thread."""
    gc.collect()
    malloc_trim()
