"""One way to run blocking work: `anyio.to_thread.run_sync` with a limiter per role.

Roles and their limiters:
- `loads`: model loads, unloads and footprint estimates (the cache runs them through `run_load`);
  a few at once, never behind inference, so a load's `model_load_timeout` is spent loading.
- `work`: decoding uploads, encoding responses, formatting `/metrics`: short CPU work.
- inference, per model: `inference_concurrency` slots each (`InferenceSlots`); a request waiting
  for a slot counts as a waiting request for back-pressure (`max_waiting_requests`).
Threads come from AnyIO's worker pool; each limiter only bounds how many of its role run at once,
so one role can never take every thread another one needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")

LOAD_THREADS = 2
WORK_THREADS = 4
# Bounds threads running inference across all models (each model is bounded by its own slots).
INFERENCE_THREADS = 32


class Workers:
    """The limiters of one app (create inside the event loop that will use them)."""

    def __init__(
        self,
        inference_concurrency: int,
        *,
        load_threads: int = LOAD_THREADS,
        work_threads: int = WORK_THREADS,
    ) -> None:
        if inference_concurrency < 1:
            raise ValueError("inference_concurrency must be at least 1")
        self.inference_concurrency = inference_concurrency
        self.loads = anyio.CapacityLimiter(load_threads)
        self.work = anyio.CapacityLimiter(work_threads)
        self.inference_threads = anyio.CapacityLimiter(INFERENCE_THREADS)
        # Semaphores, not CapacityLimiters: a stream takes its slot in the request's task and gives
        # it back in the task that sends the response (a limiter's tokens belong to one task).
        self._slots: dict[str, anyio.Semaphore] = {}

    async def run_load(self, fn: Callable[..., T], *args: Any) -> T:
        """A load, unload or footprint estimate (the cache's BlockingRunner)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.loads)

    async def run_work(self, fn: Callable[..., T], *args: Any) -> T:
        """Decoding, encoding, formatting."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.work)

    async def run_inference(self, fn: Callable[..., T], *args: Any) -> T:
        """One blocking step of an inference (the caller holds the model's slot). Cancelling the
        caller waits for the step to finish: the model is used until then."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.inference_threads)

    def slots(self, model_id: str) -> anyio.Semaphore:
        """The inference slots of one model (`inference_concurrency` at once)."""
        slot = self._slots.get(model_id)
        if slot is None:
            slot = self._slots[model_id] = anyio.Semaphore(self.inference_concurrency)
        return slot
