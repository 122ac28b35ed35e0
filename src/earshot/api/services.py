"""What the route handlers work with: settings, catalog, cache, and a bounded way to run inference."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio

from earshot.audio.pool import Decoder, InProcessDecoder
from earshot.cache.manager import Lease, ModelCache
from earshot.cache.protocol import ModelSpec, Task
from earshot.models.catalog import Catalog
from earshot.settings import Settings

T = TypeVar("T")


class Acquire(Protocol):
    """`cache.acquire`, or a wrapper of it (the tracing one opens a `cache.acquire` span)."""

    def __call__(self, model_id: str, keep_alive: float | None) -> AbstractAsyncContextManager[Lease]: ...


class InferenceRecorder(Protocol):
    """Told about every finished inference (metrics: duration histogram, audio seconds counter)."""

    def __call__(self, *, model: str, task: str, duration_s: float, audio_s: float) -> None: ...


def _no_recorder(*, model: str, task: str, duration_s: float, audio_s: float) -> None:
    return None


@dataclass
class InferenceGate:
    """At most `limit` inferences at once per model; blocking work runs in worker threads, so the
    event loop stays free (health checks and scrapes answer while a long transcription runs)."""

    limit: int
    _sems: dict[str, asyncio.Semaphore] = field(default_factory=dict)

    def _sem(self, model: str) -> asyncio.Semaphore:
        sem = self._sems.get(model)
        if sem is None:
            sem = self._sems[model] = asyncio.Semaphore(self.limit)
        return sem

    async def run(self, model: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async with self._sem(model):
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def iterate(self, model: str, make: Callable[[], Iterator[T]]) -> AsyncGenerator[T, None]:
        """Pull a blocking iterator in a worker thread, item by item, holding the model's slot.

        Closing the async iterator early (client gone) stops the worker after its current item."""
        async with self._sem(model):
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            stop = threading.Event()
            ctx = contextvars.copy_context()

            def pump() -> None:
                try:
                    for item in make():
                        loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
                        if stop.is_set():
                            break
                except BaseException as exc:  # delivered to the consumer, re-raised there
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
                else:
                    loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

            worker = loop.run_in_executor(None, ctx.run, pump)
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "item":
                        yield value
                    elif kind == "error":
                        raise value
                    else:
                        break
            finally:
                stop.set()
                # Keep the model's slot (and the caller's cache reference) until the thread is done
                # with the model: shielded, so a cancelled request still waits for its worker. From
                # AnyIO's cancellation too: Litestar cancels a streaming response whose client went
                # away through an AnyIO cancel scope, which cancels again at every await until the
                # task leaves it, so `asyncio.shield` alone gave up at once and the reference went
                # while the worker was still running inference on the model.
                with anyio.CancelScope(shield=True):
                    await asyncio.shield(worker)


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    cache: ModelCache
    gate: InferenceGate
    record_inference: InferenceRecorder = _no_recorder
    acquire_with: Acquire | None = None
    decoder: Decoder = field(default_factory=InProcessDecoder)
    started_at: float = field(default_factory=time.time)

    def acquire(self, model_id: str, keep_alive: float | None) -> AbstractAsyncContextManager[Lease]:
        """Hold a reference to a loaded model for the `async with` block (see ModelCache.acquire)."""
        if self.acquire_with is not None:
            return self.acquire_with(model_id, keep_alive)
        return self.cache.acquire(model_id, keep_alive)

    def spec_for(self, name: str, task: Task, *, param: str = "model") -> ModelSpec:
        """The catalog model a request names, checked for the task; APIError 404/400 otherwise."""
        from earshot.api.errors import bad_request, model_not_found

        spec = self.catalog.resolve(name)
        if spec is None:
            raise model_not_found(name, self.catalog.close_matches(name))
        if spec.task != task:
            route = "/v1/audio/speech" if spec.task == Task.SPEECH else "/v1/audio/transcriptions"
            raise bad_request(
                f"The model {spec.id!r} is a {spec.task.value} model and cannot do {task.value}; use it with {route}.",
                param=param,
                code="wrong_model_task",
            )
        return spec
