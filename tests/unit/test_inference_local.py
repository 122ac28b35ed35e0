"""LocalInference on the real cache with fake backends: inference slots, back-pressure, threads.

What matters here is where blocking work runs and what waits count: the models are fakes whose
"inference" blocks until the test lets it go.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import pytest
from opentelemetry.trace import NoOpTracer

from earshot.cache.errors import CacheBusy
from earshot.cache.manager import ModelCache
from earshot.cache.protocol import ModelSpec, Task
from earshot.cache.state import CacheConfig
from earshot.inference.local import LocalInference
from earshot.inference.workers import Workers
from earshot.options import TranscribeOptions
from earshot.types import Segment, Transcript
from tests.support.fakes import Catalog, FakeBackend, FakeHandle, eventually, make_spec

AUDIO = np.zeros(16_000, np.float32)


def segment(i: int) -> Segment:
    return Segment(i, float(i), i + 1.0, f" word{i}", [], 0.0, -0.1, 1.0, 0.0, None)


class _Segments(Iterator[Segment]):
    """Two segments; each waits for `gate` (the model "decoding")."""

    language = "en"
    language_probability = 1.0
    duration = 1.0

    def __init__(self, gate: threading.Event, running: list[int]) -> None:
        self._gate = gate
        self._running = running
        self._i = 0

    def __next__(self) -> Segment:
        if self._i == 2:
            raise StopIteration
        self._running.append(1)
        try:
            if not self._gate.wait(30):
                raise TimeoutError("the test never released the fake model")
        finally:
            self._running.pop()
        self._i += 1
        return segment(self._i)

    def transcript(self, segments: list[Segment]) -> Transcript:
        text = "".join(s.text for s in segments).strip()
        return Transcript(text, self.language, self.duration, segments)

    def close(self) -> None:
        pass


class StreamHandle:
    def __init__(self, inner: FakeHandle, backend: StreamingBackend) -> None:
        self.inner = inner
        self._backend = backend

    def stream(self, audio: Any, options: TranscribeOptions) -> _Segments:
        return _Segments(self._backend.gate, self._backend.running)


class StreamingBackend(FakeBackend):
    """A FakeBackend whose models transcribe in two steps, each blocked on `gate`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.running: list[int] = []  # one item per inference step running in a thread now

    def load(self, spec: ModelSpec) -> StreamHandle:  # type: ignore[override]
        return StreamHandle(super().load(spec), self)

    def unload(self, handle: StreamHandle) -> None:  # type: ignore[override]
        super().unload(handle.inner)


Service = Callable[..., tuple[LocalInference, StreamingBackend]]


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    """Builds a LocalInference on a real cache; every cache built is closed after the test, so
    its own pool's earshot-load threads do not outlive it (other tests count those threads)."""
    caches: list[ModelCache] = []

    def build(
        models: list[str], *, concurrency: int, **config: Any
    ) -> tuple[LocalInference, StreamingBackend]:
        backend = StreamingBackend()
        catalog = Catalog([make_spec(m) for m in models])
        backends = {Task.TRANSCRIPTION.value: backend}
        cache = ModelCache(catalog, backends, CacheConfig(**config), release_memory=lambda: None)
        caches.append(cache)
        inference = LocalInference(
            cache, catalog, backends, Workers(concurrency), tracer=NoOpTracer(), record=lambda **_: None
        )
        return inference, backend

    yield build
    for cache in caches:
        await cache.close()


async def test_loads_complete_while_long_inferences_hold_many_threads(service: Service) -> None:
    """More long inferences than the default executor has threads: a load of another model still
    runs at once (loads and inference never share a pool)."""
    models = [f"m{i}" for i in range(12)] + ["other"]
    inference, backend = service(models, concurrency=1)
    tasks = [asyncio.create_task(inference.transcribe(m, AUDIO, TranscribeOptions())) for m in models[:12]]
    try:
        await eventually(lambda: len(backend.running) == 12, timeout=20)
        started = time.monotonic()
        result = await asyncio.wait_for(inference.load("other"), 10)
        assert result.outcome == "miss"
        assert time.monotonic() - started < 5
        assert len(backend.running) == 12  # the inferences are still running
    finally:
        backend.gate.set()
        texts = [t.text for t in await asyncio.gather(*tasks)]
    assert texts == ["word1 word2"] * 12


async def test_requests_waiting_for_an_inference_slot_count_toward_max_waiting(service: Service) -> None:
    inference, backend = service(["a"], concurrency=1, max_waiting=2)
    first = asyncio.create_task(inference.transcribe("a", AUDIO, TranscribeOptions()))
    await eventually(lambda: len(backend.running) == 1)
    queued = [asyncio.create_task(inference.transcribe("a", AUDIO, TranscribeOptions())) for _ in range(2)]
    await eventually(lambda: inference.waiting_requests() == 2)
    started = time.monotonic()
    with pytest.raises(CacheBusy, match="max_waiting_requests=2"):
        await inference.transcribe("a", AUDIO, TranscribeOptions())
    assert time.monotonic() - started < 1  # at once, not after a wait
    backend.gate.set()
    await asyncio.gather(first, *queued)
    assert inference.waiting_requests() == 0


async def test_a_cancelled_stream_stops_at_the_next_segment_and_gives_the_model_back(
    service: Service,
) -> None:
    inference, backend = service(["a"], concurrency=1)
    stream = await inference.transcribe_stream("a", AUDIO, TranscribeOptions())
    consumer = asyncio.create_task(anext(aiter(stream)))
    await eventually(lambda: len(backend.running) == 1)
    consumer.cancel()
    backend.gate.set()  # the step in progress finishes; no further step starts
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await stream.aclose()
    [state] = inference.status_now()
    assert state.in_use == 0
    assert backend.running == []


async def test_a_stream_opened_in_one_task_is_read_and_closed_in_another(service: Service) -> None:
    """Litestar starts a stream in the handler's task and sends (and closes) it in another."""
    inference, backend = service(["a"], concurrency=1)
    backend.gate.set()
    stream = await asyncio.create_task(inference.transcribe_stream("a", AUDIO, TranscribeOptions()))

    async def send() -> list[str]:
        try:
            return [s.text async for s in stream]
        finally:
            await stream.aclose()

    assert await asyncio.create_task(send()) == [" word1", " word2"]
    [state] = inference.status_now()
    assert state.in_use == 0
    assert inference.workers.slots("a").value == 1  # the slot is back


def test_workers_need_a_slot() -> None:
    with pytest.raises(ValueError, match="inference_concurrency"):
        Workers(0)


_ = ModelSpec  # re-exported type used in annotations above


async def test_a_request_cancelled_during_inference_gives_the_model_back_after_its_step(
    service: Service,
) -> None:
    """A client gone mid-transcription: the request task is cancelled while a segment is decoding;
    that step finishes, no further one starts, and the model's reference and slot are returned."""
    inference, backend = service(["a"], concurrency=1)
    task = asyncio.create_task(inference.transcribe("a", AUDIO, TranscribeOptions()))
    await eventually(lambda: len(backend.running) == 1)
    task.cancel()
    await asyncio.sleep(0.05)
    [state] = inference.status_now()
    assert state.in_use == 1  # the step in progress still uses the model
    backend.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: inference.status_now()[0].in_use == 0)
    assert inference.workers.slots("a").value == 1
    assert backend.running == []


async def test_a_held_model_is_given_back_when_the_holder_is_cancelled_mid_inference(
    service: Service,
) -> None:
    inference, backend = service(["a"], concurrency=1)

    async def session() -> None:
        async with inference.hold("a"):
            await inference.transcribe("a", AUDIO, TranscribeOptions())

    task = asyncio.create_task(session())
    await eventually(lambda: len(backend.running) == 1)
    task.cancel()
    backend.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: inference.status_now()[0].in_use == 0)
