"""The download phase before a load: Backend.fetch, when a backend has it, under download_timeout."""

from __future__ import annotations

import asyncio

import pytest

from earshot.cache.errors import ModelLoadError, ModelLoadTimeout
from earshot.cache.events import Downloaded, DownloadStarted, Loaded, LoadFailed, LoadFailureKind, LoadStarted
from tests.support.fakes import FetchingBackend, cache_harness, eventually


async def test_fetch_runs_before_load_with_its_phase_and_events() -> None:
    backend = FetchingBackend()
    h = cache_harness(backend=backend, idle_timeout=-1)
    backend.block_fetches()
    task = asyncio.create_task(h.cache.load("a"))
    await eventually(lambda: backend.fetched == ["a"])
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.loading
    assert state.phase == "downloading"
    assert not state.loaded
    assert state.waiting == 1
    assert backend.load_calls["a"] == 0
    assert h.events.kinds("a") == ["cache_miss", "model_download_started"]
    backend.unblock_fetches()
    assert (await task).outcome == "miss"
    assert backend.loaded_after_fetch == [True]
    assert h.events.kinds("a") == [
        "cache_miss",
        "model_download_started",
        "model_downloaded",
        "model_load_started",
        "model_loaded",
    ]
    assert h.events.of(Downloaded, "a")[0].duration_s >= 0
    assert h.cache.snapshot().get("a").phase is None  # type: ignore[union-attr]


async def test_the_phase_reads_loading_while_backend_load_runs() -> None:
    backend = FetchingBackend()
    h = cache_harness(backend=backend)
    backend.block("a")
    task = asyncio.create_task(h.cache.load("a"))
    await backend.wait_started("a")
    assert h.cache.snapshot().get("a").phase == "loading"  # type: ignore[union-attr]
    backend.unblock("a")
    await task


async def test_a_failed_download_is_a_failed_load_that_says_download() -> None:
    backend = FetchingBackend()
    h = cache_harness(backend=backend)
    backend.fail_next_fetch()
    with pytest.raises(ModelLoadError, match="downloading model a failed: fake download failure"):
        await h.cache.load("a")
    assert backend.load_calls["a"] == 0
    failed = h.events.of(LoadFailed, "a")
    assert len(failed) == 1
    assert failed[0].phase == "download"
    assert failed[0].error_kind is LoadFailureKind.FAILURE
    assert h.events.of(LoadStarted, "a") == []
    assert h.cache.snapshot().get("a") is None
    # The next request retries, download included.
    assert (await h.cache.load("a")).outcome == "miss"
    assert backend.fetched == ["a", "a"]


async def test_the_download_has_its_own_timeout_apart_from_load_timeout() -> None:
    backend = FetchingBackend()
    h = cache_harness(backend=backend, download_timeout=100, load_timeout=10)
    backend.block_fetches()
    task = asyncio.create_task(h.cache.load("a"))
    await eventually(lambda: backend.fetched == ["a"])
    await eventually(lambda: h.clock.sleepers == 1)
    h.clock.advance(50)  # far past load_timeout: a download is not a load
    await asyncio.sleep(0.01)
    assert not task.done()
    h.clock.advance(50)
    with pytest.raises(
        ModelLoadTimeout, match=r"downloading model a took longer than download_timeout \(100s\)"
    ):
        await task
    failed = h.events.of(LoadFailed, "a")
    assert failed[0].error_kind is LoadFailureKind.TIMEOUT
    assert failed[0].phase == "download"
    assert backend.load_calls["a"] == 0
    backend.unblock_fetches()  # the download thread ends; nothing is loaded for it
    await eventually(lambda: backend.fetch_done == ["a"])
    await asyncio.sleep(0.01)
    assert backend.load_calls["a"] == 0
    assert h.cache.snapshot().models == ()


async def test_the_load_timeout_starts_after_the_download() -> None:
    backend = FetchingBackend()
    h = cache_harness(backend=backend, download_timeout=100, load_timeout=10)
    backend.block_fetches()
    backend.block("a")
    task = asyncio.create_task(h.cache.load("a"))
    await eventually(lambda: backend.fetched == ["a"])
    h.clock.advance(90)
    backend.unblock_fetches()
    await backend.wait_started("a")
    await eventually(lambda: h.clock.sleepers == 1)
    h.clock.advance(9)  # 99 s since the request, 9 s of load
    await asyncio.sleep(0.01)
    assert not task.done()
    backend.unblock("a")
    assert (await task).outcome == "miss"
    assert len(h.events.of(Loaded, "a")) == 1


async def test_backends_without_fetch_have_no_download_phase() -> None:
    h = cache_harness()
    await h.cache.load("a")
    assert h.events.of(DownloadStarted) == []
    assert h.events.of(Downloaded) == []
    assert h.events.kinds("a") == ["cache_miss", "model_load_started", "model_loaded"]


async def test_a_download_abandoned_by_its_request_loads_nothing() -> None:
    backend = FetchingBackend()
    h = cache_harness(backend=backend)
    backend.block_fetches()
    task = asyncio.create_task(h.cache.load("a"))
    await eventually(lambda: backend.fetched == ["a"])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert h.cache.snapshot().models == ()
    assert h.cache.snapshot().waiting_requests == 0
    backend.unblock_fetches()
    await eventually(lambda: backend.fetch_done == ["a"])  # the files stay for the next request
    await asyncio.sleep(0.01)
    assert backend.load_calls["a"] == 0
