"""`LocalInference`: models run in this process, on the model cache.

For each call: resolve nothing (the caller passes a catalog id), take an inference slot of the
model (waiting for one counts as a waiting request, bounded by `max_waiting_requests`), hold the
model through the cache (`cache.acquire`, traced), run the backend's blocking work step by step in
worker threads (so cancelling a request, a client gone, stops at the next segment or sentence),
and record the inference (duration, audio seconds, an `inference` span).

The slot is taken before the model: a request queued behind a busy model holds no cache reference,
so it keeps nothing loaded, and an idle model with queued requests may still be evicted for room
(the queued requests then reload it, as they would have had they arrived later).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal, cast

import anyio
import numpy as np
from opentelemetry.trace import Span, Tracer

from earshot.cache.events import EvictionReason
from earshot.cache.lease import Lease
from earshot.cache.manager import ModelCache
from earshot.cache.protocol import Backend
from earshot.cache.state import ModelState
from earshot.inference.protocol import PCM, LoadResult, ModelStatus, Speech
from earshot.inference.workers import Workers
from earshot.observability.tracing import traced_acquire
from earshot.options import TRANSCRIPTION_SAMPLE_RATE, SpeechOptions, TranscribeOptions
from earshot.types import ModelSpec, Segment, Task, Transcript

Recorder = Callable[..., None]

# Characters of text one Kokoro call speaks in a non-streamed synthesis (whole sentences).
SPEECH_CHUNK_CHARS = 400

_END: Any = object()


def _next(iterator: Iterator[Any]) -> Any:
    return next(iterator, _END)


def _close(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if callable(close):
        close()


class _Stream:
    """A started inference: iterate it for its items; `aclose()` (always call it, also after the
    last item) stops the work and releases the slot and the model."""

    def __init__(self, stack: AsyncExitStack, agen: AsyncGenerator[Any, None]) -> None:
        self._stack = stack
        self._agen = agen

    async def aclose(self) -> None:
        # Shielded: a cancelled request (client gone) still waits for the worker to finish its
        # step and gives the model back; nothing here waits on anything but that step.
        with anyio.CancelScope(shield=True):
            try:
                await self._agen.aclose()
            finally:
                await self._stack.aclose()


class _TranscriptStream(_Stream):
    def __init__(
        self, stack: AsyncExitStack, agen: AsyncGenerator[Segment, None], *, language: str, duration: float
    ) -> None:
        super().__init__(stack, agen)
        self._segments = agen
        self.language = language
        self.duration = duration

    def __aiter__(self) -> AsyncIterator[Segment]:
        return self._segments


class _SpeechStream(_Stream):
    def __init__(self, stack: AsyncExitStack, agen: AsyncGenerator[PCM, None], *, sample_rate: int) -> None:
        super().__init__(stack, agen)
        self._pieces = agen
        self.sample_rate = sample_rate

    def __aiter__(self) -> AsyncIterator[PCM]:
        return self._pieces


class LocalInference:
    """The `Inference` of a single process."""

    def __init__(
        self,
        cache: ModelCache,
        resolve: Callable[[str], ModelSpec | None],
        backends: Mapping[str, Backend],
        workers: Workers,
        *,
        tracer: Tracer,
        record: Recorder,
    ) -> None:
        self._cache = cache
        self._resolve = resolve
        self._backends = backends
        self.workers = workers
        self._tracer = tracer
        self._record = record

    # ------------------------------------------------------------------ holding a model

    @asynccontextmanager
    async def _model(self, model_id: str, keep_alive: float | None) -> AsyncIterator[Lease]:
        """An inference slot of the model, then the model itself, for the block."""
        slots = self.workers.slots(model_id)
        async with AsyncExitStack() as stack:
            if slots.value < 1:
                with self._cache.waiting(model_id):  # CacheBusy past max_waiting_requests
                    await stack.enter_async_context(slots)
            else:
                await stack.enter_async_context(slots)
            lease = await stack.enter_async_context(
                traced_acquire(self._cache, model_id, keep_alive, tracer=self._tracer)
            )
            yield lease

    @asynccontextmanager
    async def hold(self, model_id: str, keep_alive: float | None = None) -> AsyncIterator[None]:
        async with self._cache.acquire(model_id, keep_alive):
            yield

    def _span(self, model: str, task: Task, audio_s: float | None = None) -> Span:
        attrs: dict[str, Any] = {"earshot.model": model, "earshot.task": task.value}
        if audio_s is not None:
            attrs["earshot.audio_seconds"] = audio_s
        return self._tracer.start_span("inference", attributes=attrs)

    async def _pull(self, iterator: Iterator[Any], span: Span) -> AsyncGenerator[Any, None]:
        """The items of a blocking iterator, each made in a worker thread; closed at the end."""
        try:
            while True:
                item = await self.workers.run_inference(_next, iterator)
                if item is _END:
                    return
                yield item
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self.workers.run_inference(_close, iterator)

    # ------------------------------------------------------------------ speech to text

    async def transcribe(self, model_id: str, audio: PCM, options: TranscribeOptions) -> Transcript:
        audio_s = len(audio) / TRANSCRIPTION_SAMPLE_RATE
        async with self._model(model_id, options.keep_alive) as lease:
            started = time.perf_counter()
            span = self._span(model_id, Task.TRANSCRIPTION, audio_s)
            try:
                stream = await self.workers.run_inference(lease.handle.stream, audio, options)
                segments: list[Segment] = [s async for s in self._pull(stream, span)]
            finally:
                span.end()
            self._record(
                model=model_id,
                task=Task.TRANSCRIPTION.value,
                duration_s=time.perf_counter() - started,
                audio_s=audio_s,
            )
        return cast(Transcript, stream.transcript(segments))

    async def transcribe_stream(
        self, model_id: str, audio: PCM, options: TranscribeOptions
    ) -> _TranscriptStream:
        audio_s = len(audio) / TRANSCRIPTION_SAMPLE_RATE
        stack = AsyncExitStack()
        try:
            lease = await stack.enter_async_context(self._model(model_id, options.keep_alive))
            started = time.perf_counter()
            span = self._span(model_id, Task.TRANSCRIPTION, audio_s)
            stack.callback(span.end)
            stream = await self.workers.run_inference(lease.handle.stream, audio, options)
        except BaseException:
            await stack.aclose()
            raise

        async def segments() -> AsyncGenerator[Segment, None]:
            async for segment in self._pull(stream, span):
                yield segment
            self._record(
                model=model_id,
                task=Task.TRANSCRIPTION.value,
                duration_s=time.perf_counter() - started,
                audio_s=audio_s,
            )

        return _TranscriptStream(stack, segments(), language=stream.language, duration=stream.duration)

    # ------------------------------------------------------------------ text to speech

    async def _check(self, model_id: str, options: SpeechOptions) -> None:
        """What the backend can check from the model's files before the model is loaded (a speech
        model's voice): a bad request fails here, and loads (and evicts) nothing."""
        spec = self._resolve(model_id)
        check = getattr(self._backends.get(spec.task.value), "check", None) if spec is not None else None
        if callable(check):
            await self.workers.run_work(check, spec, options)

    async def synthesize(self, model_id: str, text: str, options: SpeechOptions) -> Speech:
        await self._check(model_id, options)
        async with self._model(model_id, options.keep_alive) as lease:
            handle = lease.handle
            started = time.perf_counter()
            span = self._span(model_id, Task.SPEECH)
            try:
                # Pieces of up to SPEECH_CHUNK_CHARS: a short text is one Kokoro.create (kokoro-onnx
                # batches within it, faster than a call per sentence: bench/ tts); a long one stops
                # between pieces when the request is cancelled (client gone).
                steps = handle.iter_synthesize(text, options, chunk_chars=SPEECH_CHUNK_CHARS)
                audio = [piece async for piece in self._pull(steps, span)]
                samples = audio[0] if len(audio) == 1 else np.concatenate(audio)
                speech = Speech(samples, int(handle.sample_rate))
                span.set_attribute("earshot.audio_seconds", speech.duration)
            finally:
                span.end()
            self._record(
                model=model_id,
                task=Task.SPEECH.value,
                duration_s=time.perf_counter() - started,
                audio_s=speech.duration,
            )
        return speech

    async def synthesize_stream(self, model_id: str, text: str, options: SpeechOptions) -> _SpeechStream:
        await self._check(model_id, options)
        stack = AsyncExitStack()
        try:
            lease = await stack.enter_async_context(self._model(model_id, options.keep_alive))
            handle = lease.handle
            started = time.perf_counter()
            span = self._span(model_id, Task.SPEECH)
            stack.callback(span.end)
            pieces = self._pull(handle.iter_synthesize(text, options), span)
            first = await anext(pieces)  # what fails on the first piece is an error of this call
        except BaseException:
            await stack.aclose()
            raise
        rate = int(handle.sample_rate)

        stack.push_async_callback(pieces.aclose)

        async def audio() -> AsyncGenerator[PCM, None]:
            audio_s = 0.0
            item: PCM | None = first
            while item is not None:
                audio_s += len(item) / rate
                yield item
                item = await anext(pieces, None)
            span.set_attribute("earshot.audio_seconds", audio_s)
            self._record(
                model=model_id,
                task=Task.SPEECH.value,
                duration_s=time.perf_counter() - started,
                audio_s=audio_s,
            )

        return _SpeechStream(stack, audio(), sample_rate=rate)

    async def voices(self, model_id: str) -> Sequence[str]:
        spec = self._resolve(model_id)
        if spec is None:
            from earshot.cache.errors import UnknownModel

            raise UnknownModel(f"model {model_id!r} is not in the catalog", model=model_id)
        backend = self._backends.get(spec.task.value)
        read = getattr(backend, "voices", None)
        if not callable(read):
            return []
        return cast(Sequence[str], await self.workers.run_work(read, spec))

    # ------------------------------------------------------------------ management

    async def load(
        self, model_id: str, *, keep_alive: float | None = None, pin: bool | None = None
    ) -> LoadResult:
        lease = await self._cache.load(model_id, keep_alive, pin=pin)
        return LoadResult(lease.spec.id, cast(Literal["hit", "miss", "coalesced"], lease.outcome))

    async def unload(self, model_id: str) -> Literal["unloaded", "scheduled", "not_loaded"]:
        result = await self._cache.unload(model_id, EvictionReason.MANUAL)
        return cast(Literal["unloaded", "scheduled", "not_loaded"], result)

    async def status(self) -> Sequence[ModelStatus]:
        return self.status_now()

    def status_now(self, worker: str | None = None) -> list[ModelStatus]:
        """`status()` without awaiting (the cache's table is read on the event loop)."""
        return [model_status(m, worker) for m in self._cache.snapshot().models]

    def waiting_requests(self) -> int:
        return self._cache.snapshot().waiting_requests

    @property
    def ready(self) -> bool:
        return self._cache.ready

    def describe(self) -> dict[str, Any]:
        config = self._cache.snapshot().config
        return {
            "max_models": config.max_models,
            "memory_budget_bytes": config.memory_budget_bytes,
            "idle_timeout": config.idle_timeout,
        }


def model_status(state: ModelState, worker: str | None = None) -> ModelStatus:
    return ModelStatus(
        id=state.id,
        task=state.task,
        loaded=state.loaded,
        loading=state.loading,
        loading_since=state.loading_since,
        loaded_at=state.loaded_at,
        last_used_at=state.last_used_at,
        idle_seconds=state.idle_seconds,
        expires_at=state.expires_at,
        in_use=state.in_use,
        pinned=state.pinned,
        size_bytes=state.footprint_bytes,
        size_measured=state.footprint_measured,
        memory=dict(state.footprint),
        waiting=state.waiting,
        keep_alive=state.keep_alive,
        phase=state.phase,
        worker=worker,
    )
