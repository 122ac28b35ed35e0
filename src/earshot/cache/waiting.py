"""Back-pressure: how many requests wait, in the cache or (counted through it) outside it.

One counter per model id; the total is their sum. `enter` refuses at once with `CacheBusy` when
`limit` requests already wait; `leave` must follow every successful `enter` (use `hold`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from earshot.cache.errors import CacheBusy


class WaitCounter:
    """Requests waiting right now, per model id, bounded by `limit` in all."""

    __slots__ = ("_counts", "_total", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: Counter[str] = Counter()
        self._total = 0  # sum of _counts, kept so that `total` is O(1) on the request path

    @property
    def total(self) -> int:
        return self._total

    def of(self, model_id: str) -> int:
        return self._counts.get(model_id, 0)

    def check(self, model_id: str) -> None:
        """Raise CacheBusy if one more request may not wait now."""
        if self._total >= self.limit:
            raise CacheBusy(
                f"cache busy: {self._total} requests already waiting for models "
                f"(max_waiting_requests={self.limit}); retry later",
                model=model_id,
            )

    def enter(self, model_id: str) -> None:
        self.check(model_id)
        self._counts[model_id] += 1
        self._total += 1

    def leave(self, model_id: str) -> None:
        count = self._counts[model_id] - 1
        if count < 0:
            raise RuntimeError(f"WaitCounter: leave without enter for {model_id}")
        if count:
            self._counts[model_id] = count
        else:
            del self._counts[model_id]
        self._total -= 1

    @contextmanager
    def hold(self, model_id: str) -> Iterator[None]:
        """Count one request waiting for `model_id` for the duration of the block (CacheBusy if full)."""
        self.enter(model_id)
        try:
            yield
        finally:
            self.leave(model_id)
