"""Idle expiry: timeouts and their overrides, deadline scheduling, exact snapshot ages, pins.

All with a FakeClock: hours of idle time pass in microseconds, nothing sleeps for real.
"""

from __future__ import annotations

import asyncio

import pytest

from earshot.cache.events import Evicted, EvictionReason
from tests.support.fakes import CacheHarness, cache_harness, eventually, make_spec


async def _settle() -> None:
    """Let woken tasks (and the instant unloads in worker threads) run."""
    for _ in range(5):
        await asyncio.sleep(0.002)


async def _evicted(h: CacheHarness, model: str) -> Evicted:
    await eventually(lambda: bool(h.events.of(Evicted, model)), what=f"{model} to be evicted")
    return h.events.of(Evicted, model)[0]


async def test_an_idle_model_is_evicted_when_its_timeout_passes() -> None:
    h = cache_harness(idle_timeout=60)
    await h.cache.load("a")
    h.clock.advance(59.9)
    await _settle()
    assert h.loaded_ids() == ["a"]
    h.clock.advance(0.2)
    evicted = await _evicted(h, "a")
    assert evicted.reason is EvictionReason.IDLE
    assert evicted.idle_s == pytest.approx(60.1)
    assert evicted.resident_s == pytest.approx(60.1)
    assert evicted.footprint_bytes == 100
    assert evicted.released_bytes == 100
    assert h.cache.snapshot().models == ()
    assert h.backend.unloads == 1


async def test_seed_scenario_six_hour_idle_timeout() -> None:
    """SPEACHES_MODEL_IDLE_TIMEOUT=21600: loaded after 5 h 59 min idle, evicted after 6 h 1 min.

    The seed variable goes through the real settings and the app's settings-to-cache mapping."""
    from dataclasses import asdict

    from earshot.main import cache_config
    from earshot.settings import load_settings

    config = cache_config(load_settings(environ={"SPEACHES_MODEL_IDLE_TIMEOUT": "21600"}, env_file=None))
    assert config.idle_timeout == 21600
    h = cache_harness(**asdict(config))
    async with h.cache.acquire("a"):
        pass
    h.clock.advance(5 * 3600 + 59 * 60)
    await _settle()
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.loaded
    assert state.idle_seconds == pytest.approx(21540, abs=1e-6)
    assert state.expires_at == pytest.approx(h.clock.wall() + 60, abs=1e-6)
    assert h.events.of(Evicted) == []
    h.clock.advance(2 * 60)
    evicted = await _evicted(h, "a")
    assert evicted.reason is EvictionReason.IDLE
    assert evicted.idle_s == pytest.approx(6 * 3600 + 60)
    assert h.cache.snapshot().get("a") is None


async def test_keep_alive_zero_unloads_as_soon_as_the_last_reference_goes() -> None:
    h = cache_harness(idle_timeout=300)
    async with h.cache.acquire("a", keep_alive=0):
        async with h.cache.acquire("a", keep_alive=0):
            pass
        await _settle()
        assert h.loaded_ids() == ["a"]  # still referenced once
    evicted = await _evicted(h, "a")
    assert evicted.reason is EvictionReason.IDLE
    assert evicted.idle_s == 0


async def test_keep_alive_minus_one_never_expires() -> None:
    h = cache_harness(idle_timeout=60)
    await h.cache.load("a", keep_alive=-1)
    h.clock.advance(10 * 365 * 86400)
    await _settle()
    state = h.cache.snapshot().get("a")
    assert state is not None
    assert state.loaded
    assert state.expires_at is None
    assert state.keep_alive == -1
    assert state.idle_seconds == pytest.approx(10 * 365 * 86400)
    assert h.clock.sleepers == 0  # no timer at all


async def test_config_idle_timeout_minus_one_never_expires() -> None:
    h = cache_harness(idle_timeout=-1)
    await h.cache.load("a")
    h.clock.advance(1e7)
    await _settle()
    assert h.loaded_ids() == ["a"]


async def test_config_idle_timeout_zero_unloads_at_release() -> None:
    h = cache_harness(idle_timeout=0)
    await h.cache.load("a")
    assert (await _evicted(h, "a")).reason is EvictionReason.IDLE


async def test_per_model_idle_timeout_overrides_the_config() -> None:
    h = cache_harness([make_spec("short", idle_timeout=10), "a"], idle_timeout=60)
    await h.cache.load("short")
    await h.cache.load("a")
    assert h.cache.snapshot().get("short").keep_alive == 10  # type: ignore[union-attr]
    h.clock.advance(11)
    await _evicted(h, "short")
    assert h.loaded_ids() == ["a"]


async def test_keep_alive_overrides_the_per_model_timeout() -> None:
    h = cache_harness([make_spec("a", idle_timeout=10)], idle_timeout=60)
    await h.cache.load("a", keep_alive=100)
    h.clock.advance(50)
    await _settle()
    assert h.loaded_ids() == ["a"]
    h.clock.advance(51)
    assert (await _evicted(h, "a")).idle_s == pytest.approx(101)


async def test_the_latest_requests_keep_alive_applies_after_the_last_release() -> None:
    h = cache_harness(idle_timeout=300)
    async with h.cache.acquire("a", keep_alive=-1), h.cache.acquire("a", keep_alive=5):
        pass
    # The request that came last asked for 5 s; released last or not, its value holds.
    assert h.cache.snapshot().get("a").keep_alive == 5  # type: ignore[union-attr]
    h.clock.advance(6)
    await _evicted(h, "a")


async def test_a_request_without_keep_alive_resets_to_the_default() -> None:
    h = cache_harness(idle_timeout=300)
    await h.cache.load("a", keep_alive=-1)
    await h.cache.load("a")
    assert h.cache.snapshot().get("a").keep_alive == 300  # type: ignore[union-attr]
    h.clock.advance(301)
    await _evicted(h, "a")


async def test_a_held_model_never_expires_during_a_long_inference() -> None:
    h = cache_harness(idle_timeout=60)
    async with h.cache.acquire("a") as lease:
        h.clock.advance(600)  # ten timeouts pass while the request holds the model
        await _settle()
        state = h.cache.snapshot().get("a")
        assert state is not None
        assert state.loaded
        assert state.in_use == 1
        assert state.idle_seconds is None
        assert state.expires_at is None
        assert not lease.handle.unloaded
    # The timer starts at the release.
    h.clock.advance(59)
    await _settle()
    assert h.loaded_ids() == ["a"]
    h.clock.advance(2)
    evicted = await _evicted(h, "a")
    assert evicted.idle_s == pytest.approx(61)
    assert evicted.resident_s == pytest.approx(661)


async def test_a_use_before_the_deadline_restarts_the_timer() -> None:
    h = cache_harness(idle_timeout=60)
    await h.cache.load("a")
    h.clock.advance(50)
    await h.cache.load("a")
    h.clock.advance(50)  # 100 s after the first release, 50 s after the second
    await _settle()
    assert h.loaded_ids() == ["a"]
    assert h.events.of(Evicted) == []
    h.clock.advance(11)
    assert (await _evicted(h, "a")).idle_s == pytest.approx(61)


async def test_snapshot_idle_seconds_and_expires_at_are_exact() -> None:
    h = cache_harness(idle_timeout=120)
    async with h.cache.acquire("a"):
        h.clock.advance(3)  # time in use does not count as idle
    released_wall = h.clock.wall()
    for step in (0.0, 12.345678, 0.000001, 47.5):
        h.clock.advance(step)
        state = h.cache.snapshot().get("a")
        assert state is not None
        elapsed = h.clock.wall() - released_wall
        assert abs(state.idle_seconds - elapsed) < 1e-6  # type: ignore[operator]
        assert abs(state.expires_at - (released_wall + 120)) < 1e-6  # type: ignore[operator]
        assert state.last_used_at == pytest.approx(released_wall)
        assert state.keep_alive == 120
        assert state.in_use == 0
        assert state.loaded
        assert not state.loading


async def test_one_timer_for_many_idle_models_at_the_earliest_deadline() -> None:
    h = cache_harness(idle_timeout=100)
    await h.cache.load("a", keep_alive=30)
    await h.cache.load("b", keep_alive=10)
    await h.cache.load("c", keep_alive=20)
    await h.cache.load("d")
    await _settle()
    start = h.clock.monotonic()
    assert h.clock.sleepers == 1
    assert h.clock.next_wakeup() == pytest.approx(start + 10)
    h.clock.advance(10)
    await _evicted(h, "b")
    await _settle()
    assert h.clock.sleepers == 1
    assert h.clock.next_wakeup() == pytest.approx(start + 20)
    h.clock.advance(10)
    await _evicted(h, "c")
    h.clock.advance(10)
    await _evicted(h, "a")
    await _settle()
    assert h.loaded_ids() == ["d"]
    assert h.clock.next_wakeup() == pytest.approx(start + 100)


async def test_an_earlier_deadline_reschedules_the_timer() -> None:
    h = cache_harness(idle_timeout=100)
    await h.cache.load("a")
    await _settle()
    assert h.clock.next_wakeup() == pytest.approx(h.clock.monotonic() + 100)
    await h.cache.load("b", keep_alive=5)
    await _settle()
    assert h.clock.sleepers == 1
    assert h.clock.next_wakeup() == pytest.approx(h.clock.monotonic() + 5)
    h.clock.advance(5)
    await _evicted(h, "b")
    assert h.loaded_ids() == ["a"]


async def test_pinned_models_are_exempt_from_idle_eviction() -> None:
    h = cache_harness([make_spec("p", pin=True), "a"], idle_timeout=60)
    await h.cache.load("p", keep_alive=0)  # even keep_alive 0 does not unload a pinned model
    await h.cache.load("a")
    await h.cache.load("a", pin=True)
    h.clock.advance(86400)
    await _settle()
    assert sorted(h.loaded_ids()) == ["a", "p"]
    for model in ("a", "p"):
        state = h.cache.snapshot().get(model)
        assert state is not None
        assert state.pinned
        assert state.expires_at is None
    # Unpinning brings the idle timer back.
    await h.cache.load("a", pin=False)
    h.clock.advance(61)
    assert (await _evicted(h, "a")).reason is EvictionReason.IDLE
    assert h.loaded_ids() == ["p"]
