"""Give memory back to the operating system after a model is unloaded.

Dropping the last reference to a model frees its objects, but CPython's allocator and glibc's
malloc keep the freed pages mapped: the process RSS stays high and the next model may not fit.
`release_memory()` runs a full garbage collection (models often sit in reference cycles) and then
asks glibc to return free heap pages to the OS with `malloc_trim(0)`. Stdlib only; on platforms
without glibc it is just a garbage collection. Blocking: call it from a worker thread.

`tune_allocator()`, called once when the app is built, keeps the heap from growing in the first
place (see its docstring).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("earshot.cache")

_malloc_trim: Callable[[int], int] | None = None
_looked_up = False
_lookup_lock = threading.Lock()


M_ARENA_MAX = -8  # glibc's mallopt() parameter (malloc.h); MALLOC_ARENA_MAX sets it at start-up
ARENA_MAX = 2


def _libc_function(name: str, argtypes: list[Any]) -> Any | None:
    """A glibc function with an int result, or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none."""
    return _libc_function("malloc_trim", [ctypes.c_size_t])


def tune_allocator() -> dict[str, int]:
    """Set glibc's malloc so that the process does not keep the memory of the audio it handled.

    glibc gives each thread that allocates concurrently a heap (arena) of its own, up to 8 per
    core. Requests decode audio, run inference and encode speech in worker threads, so their
    buffers end up spread over many arenas, each keeping its high-water mark and fragments that
    `malloc_trim` cannot give back: RSS grows with traffic. At most 2 arenas keep it flat: in a
    180 s soak (tests/integration/test_soak.py, 3 models, max_models=1) RSS with no model loaded
    went 263 -> 339 MiB without, 179 -> 184 MiB with, and warm transcription took no longer
    (bench stt, ratio 0.94). A fixed mmap threshold (`M_MMAP_THRESHOLD` 128 KiB) saved little more
    and made transcription 28% slower (every large buffer mapped and faulted in anew), so it is not
    set. A value given in the environment (`MALLOC_ARENA_MAX`) is the operator's and is left alone.
    Returns the settings made (name -> value); empty without glibc. Call before worker threads start.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return {}
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None or mallopt(M_ARENA_MAX, ARENA_MAX) != 1:
        return {}
    return {"MALLOC_ARENA_MAX": ARENA_MAX}


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


def trim_heap() -> None:
    """Trim the C heap only (no garbage collection): cheap enough to run around every load."""
    malloc_trim()


def release_memory() -> None:
    """Collect garbage (all generations), then trim the C heap. Blocking; run it in a worker thread."""
    gc.collect()
    malloc_trim()
