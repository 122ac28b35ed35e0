"""The cache event log: ring buffer, ids, records, and bounded subscriptions."""

from __future__ import annotations

import asyncio
import json

import pytest

from earshot.cache.events import (
    Evicted,
    EvictionReason,
    Hit,
    Loaded,
    LoadFailed,
    LoadFailureKind,
    LoadStarted,
    Miss,
)
from earshot.observability.events import END, EventLog, Gap, event_record

T0 = 1_700_000_000.0
STT = {"model": "faster-whisper-tiny.en", "task": "transcription"}


def misses(n: int, start: int = 0) -> list[Miss]:
    """Lifecycle events (buffered, unlike hits)."""
    return [Miss(**STT, at=T0 + start + i) for i in range(n)]


def test_records_are_json_with_kind_time_and_fields() -> None:
    loaded = Loaded(
        **STT,
        at=T0 + 0.25,
        duration_s=1.5,
        footprint_bytes=10,
        footprint={"cpu": 10},
        reload=True,
        reading_bytes=12,
    )
    assert event_record(loaded, 7) == {
        "id": 7,
        "event": "model_loaded",
        "model": "faster-whisper-tiny.en",
        "task": "transcription",
        "at": "2023-11-14T22:13:20.250+00:00",
        "duration_s": 1.5,
        "footprint_bytes": 10,
        "footprint": {"cpu": 10},
        "measured": True,
        "reload": True,
        "reading_bytes": 12,
    }
    evicted = Evicted(
        **STT,
        at=T0,
        reason=EvictionReason.CAPACITY,
        idle_s=1.0,
        resident_s=2.0,
        footprint_bytes=3,
        released_bytes=4,
    )
    failed = LoadFailed(**STT, at=T0, duration_s=1.0, error_kind=LoadFailureKind.TIMEOUT, message="slow")
    assert event_record(evicted, 1)["reason"] == "capacity"
    assert event_record(failed, 2)["error_kind"] == "timeout"
    for record in (event_record(evicted, 1), event_record(failed, 2), event_record(loaded, 3)):
        assert json.loads(json.dumps(record)) == record  # plain JSON types only


def test_ring_buffer_keeps_the_newest_in_order_with_increasing_ids() -> None:
    log = EventLog(5)
    for event in misses(12):
        log(event)
    recent = log.recent()
    assert [r["id"] for r in recent] == [8, 9, 10, 11, 12]  # newest last, ids never reused
    assert [r["at"] for r in recent] == sorted(r["at"] for r in recent)
    assert log.last_id == 12
    assert [r["id"] for r in log.recent(2)] == [11, 12]
    assert [r["id"] for r in log.recent(after=10)] == [11, 12]
    assert [r["id"] for r in log.recent(1, after=9)] == [12]
    assert log.recent(after=12) == []


def test_mixed_events_keep_their_kinds() -> None:
    log = EventLog(10)
    log(Miss(**STT, at=T0))
    log(LoadStarted(**STT, at=T0, reload=False))
    log(Loaded(**STT, at=T0 + 1, duration_s=1.0, footprint_bytes=1))
    assert [r["event"] for r in log.recent()] == ["cache_miss", "model_load_started", "model_loaded"]


async def test_subscribers_get_new_records_in_order() -> None:
    log = EventLog(100)
    log(Miss(**STT, at=T0))  # before subscribing: not delivered
    with log.subscribe() as sub:
        for event in misses(3, start=1):
            log(event)
        got = [await asyncio.wait_for(sub.get(), 1) for _ in range(3)]
    assert [r["id"] for r in got if not isinstance(r, Gap)] == [2, 3, 4]
    assert log.subscribers == 0


async def test_a_slow_subscriber_loses_events_and_is_told_where() -> None:
    log = EventLog(100)
    slow = log.subscribe(queue_size=3)
    fast = log.subscribe(queue_size=100)
    for event in misses(10):
        log(event)  # never blocks, whatever the subscribers do
    got = [await asyncio.wait_for(slow.get(), 1) for _ in range(3)]
    assert [r["id"] for r in got if not isinstance(r, Gap)] == [1, 2, 3]
    assert slow.dropped == 7
    # room again: the gap marker comes first, then the newer events
    log(Miss(**STT, at=T0 + 20))
    gap = await asyncio.wait_for(slow.get(), 1)
    assert gap == Gap(dropped=7)
    after = await asyncio.wait_for(slow.get(), 1)
    assert not isinstance(after, Gap)
    assert after["id"] == 11
    fast_ids = [
        r["id"] for r in [await asyncio.wait_for(fast.get(), 1) for _ in range(11)] if not isinstance(r, Gap)
    ]
    assert fast_ids == list(range(1, 12))
    slow.close()
    fast.close()
    assert log.subscribers == 0


async def test_hits_stay_out_of_the_buffer_and_reach_only_subscribers_that_ask() -> None:
    log = EventLog(5)
    log(Miss(**STT, at=T0))
    for i in range(100):
        log(Hit(**STT, at=T0 + i))
    assert [r["event"] for r in log.recent()] == ["cache_miss"]  # 100 hits pushed nothing out
    with log.subscribe() as plain, log.subscribe(hits=True) as watcher:
        log(Hit(**STT, at=T0 + 200))
        log(Miss(**STT, at=T0 + 201))
        got_plain = await asyncio.wait_for(plain.get(), 1)
        got_hit = await asyncio.wait_for(watcher.get(), 1)
        got_miss = await asyncio.wait_for(watcher.get(), 1)
    assert not isinstance(got_plain, Gap | type(END))
    assert got_plain["event"] == "cache_miss"
    assert not isinstance(got_hit, Gap | type(END))
    assert got_hit["event"] == "cache_hit"
    assert not isinstance(got_miss, Gap | type(END))
    assert got_miss["id"] == got_plain["id"]
    assert [r["event"] for r in log.recent()] == ["cache_miss", "cache_miss"]


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least one"):
        EventLog(0)


async def test_close_ends_every_subscription_after_what_it_queued() -> None:
    log = EventLog(10)
    sub = log.subscribe()
    log(Miss(**STT, at=T0))
    log.close()
    first = await asyncio.wait_for(sub.get(), 1)
    assert not isinstance(first, Gap | type(END))
    assert await asyncio.wait_for(sub.get(), 1) is END
    late = log.subscribe()  # a client connecting during shutdown ends at once
    assert await asyncio.wait_for(late.get(), 1) is END
    assert log.recent()[0]["id"] == 1  # the buffer stays readable
