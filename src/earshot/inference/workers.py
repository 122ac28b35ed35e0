"""One way to run blocking work: `anyio.to_thread.run_sync` with a limiter per role.

Roles and their limiters:
- `loads`: model loads, unloads and footprint estimates (the cache runs them through `run_load`);
  a few at once, never behind inference, so a load's `model_load_timeout` is spent loading.
- `work`: decoding uploads, encoding responses, formatting `/metrics`: short CPU work.
- inference, per model: `inference_concurrency` slots each (`InferenceSlots`); a request waiting
  for a slot counts as a waiting request for back-pressure (`max_waiting_requests`).
Threads come from AnyIO's worker pool; each limiter only bounds how many of its role run at once,
so one role can never take every thread another one needs. The exception is the `loads` role:
each of its calls runs in a thread of its own that ends with the call (`run_in_own_thread`), see
there why.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")

LOAD_THREADS = 2
WORK_THREADS = 4
# Bounds threads running inference across all models (each model is bounded by its own slots).
INFERENCE_THREADS = 32
LOAD_THREAD_NAME = "earshot-model-load"  # not the cache own pool's earshot-load-N


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
        """A download, load, unload or footprint estimate, in a thread of its own (`run_in_own_thread`)."""
        async with self.loads:
            return await run_in_own_thread(fn, *args)

    @property
    def load_runner(self) -> LoadRunner:
        """The cache's BlockingRunner: its blocking work on the `loads` limiter."""
        return LoadRunner(self)

    async def run_work(self, fn: Callable[..., T], *args: Any) -> T:
        """Decoding, encoding, formatting."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.work)

    async def run_inference(self, fn: Callable[..., T], *args: Any) -> T:
        """One blocking step of an inference (the caller holds the model's slot). A cancelled
        caller (client gone) still waits for the step to finish before the cancellation goes on:
        the thread uses the model until then, so the caller's reference to it must stay. AnyIO's
        own wait for a thread is shielded only against AnyIO cancel scopes; a plain `task.cancel()`
        would end it at once."""
        step = asyncio.ensure_future(anyio.to_thread.run_sync(fn, *args, limiter=self.inference_threads))
        return await _until_done(step)

    def slots(self, model_id: str) -> anyio.Semaphore:
        """The inference slots of one model (`inference_concurrency` at once)."""
        slot = self._slots.get(model_id)
        if slot is None:
            slot = self._slots[model_id] = anyio.Semaphore(self.inference_concurrency)
        return slot


async def run_in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a new thread that ends when the call returns (in the caller's context vars).
    Like AnyIO's `run_sync`, a cancelled caller still waits for the call to finish.

    Why not a pooled thread: CTranslate2 (faster-whisper) runs OpenMP parallel regions while it
    loads a model, and libgomp gives the loading thread a team of threads that lives as long as
    that thread does. Those idle threads count as threads libgomp manages; once it manages more
    threads than there are CPUs, it stops spinning between parallel regions and every inference
    pays for futex sleeps and wake-ups. On a 2-core machine, tiny.en transcribed jfk.flac in
    0.65-0.81 s after a load on a thread that stayed alive and in 0.47-0.59 s after a load on a
    thread that had ended (`bench stt` keeps the comparison). A thread that ends takes its team
    with it. Loads are rare, so a thread each costs nothing that matters.
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=LOAD_THREAD_NAME)
    try:
        return await _until_done(loop.run_in_executor(executor, functools.partial(context.run, fn, *args)))
    finally:
        # Return once the thread has ended, its team with it: what the caller does next may be the
        # model's first inference.
        await _until_done(asyncio.ensure_future(asyncio.to_thread(executor.shutdown, True)))


async def _until_done(step: asyncio.Future[T]) -> T:
    """The result of `step`; if the caller is cancelled meanwhile, wait for `step` anyway, then
    let the cancellation go on."""
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        await _outlast(step)
        raise


async def _outlast(step: asyncio.Future[Any]) -> None:
    """Wait until `step` is done, whatever cancellations arrive meanwhile (its result is dropped)."""
    with anyio.CancelScope(shield=True):
        while not step.done():
            try:
                await asyncio.wait({step})
            except asyncio.CancelledError:
                continue
    if not step.cancelled():
        step.exception()  # retrieved: no "exception was never retrieved" warning


class LoadRunner:
    """`earshot.cache.protocol.BlockingRunner` on the `loads` limiter of `Workers`."""

    def __init__(self, workers: Workers) -> None:
        self._workers = workers

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await self._workers.run_load(fn, *args)
