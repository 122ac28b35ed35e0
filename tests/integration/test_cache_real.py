"""The cache with the real backends and the demo models: capacity and idle eviction, and memory
that really goes back after unloads."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from earshot.audio.decode import decode_audio
from earshot.backends import default_backends
from earshot.cache.events import CacheEvent, Evicted, EvictionReason, Loaded
from earshot.cache.manager import ModelCache
from earshot.cache.memory import release_memory
from earshot.cache.protocol import rss_probe
from earshot.cache.state import CacheConfig
from earshot.models.catalog import build_catalog
from tests.conftest import DEMO_MODELS, JFK_TEXT, words

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"


def make_cache(models_dir: Path, events: list[CacheEvent], **config: float | int | None) -> ModelCache:
    catalog = build_catalog(models_dir=models_dir, builtin_hub_models=False)
    return ModelCache(
        catalog.resolve,
        default_backends("cpu", "int8"),
        CacheConfig(**config),  # type: ignore[arg-type]
        observers=[events.append],
    )


@pytest.fixture(scope="module")
def jfk_audio(jfk_flac: Path) -> object:
    return decode_audio(jfk_flac.read_bytes())


async def test_max_models_one_alternating_evicts_by_capacity(models_dir: Path, jfk_audio: object) -> None:
    events: list[CacheEvent] = []
    cache = make_cache(models_dir, events, max_models=1)
    texts = []
    try:
        for model in (TINY, BASE, TINY, BASE):
            async with cache.acquire(model) as lease:
                transcript = await asyncio.to_thread(lease.handle.transcribe, jfk_audio)
                texts.append(transcript.text)
            assert [m.id for m in cache.snapshot().loaded] == [model]
    finally:
        await cache.close()
    for text in texts:
        assert len(set(words(text)) ^ set(words(JFK_TEXT))) <= 2, text
    evictions = [e for e in events if isinstance(e, Evicted)]
    capacity = [(e.model, e.reason) for e in evictions if e.reason is not EvictionReason.SHUTDOWN]
    assert capacity == [
        (TINY, EvictionReason.CAPACITY),
        (BASE, EvictionReason.CAPACITY),
        (TINY, EvictionReason.CAPACITY),
    ]
    loads = [e for e in events if isinstance(e, Loaded)]
    assert [(e.model, e.reload) for e in loads] == [(TINY, False), (BASE, False), (TINY, True), (BASE, True)]
    assert all(e.footprint_bytes > 20_000_000 for e in loads)  # measured RSS growth, tens of MB each


async def test_idle_timeout_one_second_evicts_tiny_by_idle(models_dir: Path, jfk_audio: object) -> None:
    events: list[CacheEvent] = []
    cache = make_cache(models_dir, events, idle_timeout=1)
    try:
        async with cache.acquire(TINY) as lease:
            await asyncio.to_thread(lease.handle.transcribe, jfk_audio)
        assert [m.id for m in cache.snapshot().loaded] == [TINY]
        for _ in range(100):
            if not cache.snapshot().models:
                break
            await asyncio.sleep(0.05)
        assert cache.snapshot().models == ()
    finally:
        await cache.close()
    evicted = [e for e in events if isinstance(e, Evicted)]
    assert [(e.model, e.reason) for e in evicted] == [(TINY, EvictionReason.IDLE)]
    assert 1.0 <= evicted[0].idle_s < 2.0
    assert evicted[0].released_bytes > 0.5 * evicted[0].footprint_bytes  # the memory went back


async def test_rss_returns_after_twenty_load_unload_cycles(models_dir: Path) -> None:
    """After 20 load/unload cycles of the three demo models, RSS stays within 15% of its value
    after the first cycle: unloads drop every reference and malloc_trim hands the heap back."""
    events: list[CacheEvent] = []
    cache = make_cache(models_dir, events)
    samples: list[int] = []
    try:
        for _ in range(20):
            for model in DEMO_MODELS:
                await cache.load(model)
            for model in DEMO_MODELS:
                assert await cache.unload(model) == "unloaded"
            gc.collect()
            release_memory()
            samples.append(rss_probe()["cpu"])
    finally:
        await cache.close()
    first, last = samples[0], samples[-1]
    assert abs(last - first) <= 0.15 * first, [s // 2**20 for s in samples]
    tail = samples[-5:]
    assert sum(tail) / len(tail) <= 1.15 * first, [s // 2**20 for s in samples]  # no steady climb
    assert len([e for e in events if isinstance(e, Loaded)]) == 60
