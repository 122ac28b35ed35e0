"""The blocking halves of a load and an unload, run in worker threads.

They measure memory around the backend call with the cache's probe; the cache turns the numbers
into the footprint (at load) and the bytes released (at unload).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from earshot.cache.protocol import Backend, MemoryProbe, ModelSpec

logger = logging.getLogger("earshot.cache")


def read_probe(probe: MemoryProbe) -> Mapping[str, int]:
    """The probe's reading, or {} if it fails (a broken probe must not fail loads)."""
    try:
        return probe()
    except Exception:
        logger.warning("memory probe failed", exc_info=True)
        return {}


def estimate_footprint(backend: Backend, spec: ModelSpec) -> int:
    """`backend.footprint(spec)` if it gives a positive number, else `spec.size_bytes`."""
    try:
        estimate = int(backend.footprint(spec))
    except Exception:
        logger.warning("footprint estimate of model %s failed", spec.id, exc_info=True)
        estimate = 0
    return estimate if estimate > 0 else max(0, spec.size_bytes)


def load_measured(
    backend: Backend, spec: ModelSpec, probe: MemoryProbe, release: Callable[[], None] | None = None
) -> tuple[Any, dict[str, int]]:
    """Load the model; return its handle and the memory it added per device (positive deltas only).

    The delta is the probe after minus before; an empty dict means the measurement was unusable
    (nothing grew), and the caller falls back to the estimate. `release()` (gc + malloc_trim) runs
    before each reading, so that both see a heap with its free memory given back: before, memory
    that requests freed (and the allocator kept) would otherwise be reused by the load unseen, and
    after, the load's own temporaries (file buffers, conversions) would be counted as the model's.
    On a quiet server tiny.en then reads 52 MiB on every load after the first (which also pays
    for one-time library set-up). What a reading can still include is what other threads allocate
    or free during the load itself (loads running at the same time inflate each other's deltas;
    sequential preloads avoid that at start-up): `earshot.cache.footprint` makes the model's
    figure the median of its last readings.
    """
    _release(release, "before a load")
    before = read_probe(probe)
    handle = backend.load(spec)
    _release(release, "after a load")
    after = read_probe(probe)
    grown = {device: after[device] - before.get(device, 0) for device in after}
    return handle, {device: delta for device, delta in grown.items() if delta > 0}


def _release(release: Callable[[], None] | None, when: str) -> None:
    if release is None:
        return
    try:
        release()
    except Exception:
        logger.exception("releasing memory %s failed", when)


def unload_released(
    backend: Backend,
    box: list[Any],
    probe: MemoryProbe,
    release: Callable[[], None],
) -> int:
    """Unload the handle in `box`, free memory, and return the bytes given back (before - after).

    `release()` (gc + malloc_trim) runs twice: first before the `before` reading, so that memory
    already freed by others (request buffers the allocator kept) goes back to the OS then and
    is not counted as the model's; then after the unload, for the model's own memory. What the
    figure can still include is memory other threads free during the unload itself.

    The handle comes in a one-item list that this function empties, so that the only reference
    left while `release()` runs is none at all: an argument passed directly would stay
    referenced by the executor's work item until the call returns.
    """
    _release(release, "before an unload")
    before = read_probe(probe)
    handle = box.pop()
    try:
        backend.unload(handle)
    except Exception:
        logger.exception("backend.unload failed; dropping the model anyway")
    finally:
        del handle
    _release(release, "after an unload")
    after = read_probe(probe)
    return sum(before.values()) - sum(after.values())
