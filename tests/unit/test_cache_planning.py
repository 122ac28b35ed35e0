"""plan_room(): which idle models go so that one more fits."""

from __future__ import annotations

from earshot.cache.entry import Entry, EntryState
from earshot.cache.events import EvictionReason
from earshot.cache.planning import plan_room
from tests.support.fakes import make_entry


def _entry(
    model_id: str, size: int, *, state: EntryState = EntryState.LOADED, refs: int = 0, pinned: bool = False
) -> Entry:
    return make_entry(model_id, size, state=state, refs=refs, pinned=pinned)


def _new(size: int) -> Entry:
    return make_entry("new", size, state=EntryState.ADMITTING)


def _ids(plan: list[tuple[Entry, EvictionReason]] | None) -> list[tuple[str, str]] | None:
    return None if plan is None else [(e.spec.id, r.value) for e, r in plan]


def test_fits_without_eviction() -> None:
    entries = [_entry("a", 100)]
    assert plan_room(entries, _new(100), max_models=2, budget=200) == []
    assert plan_room(entries, _new(100), max_models=None, budget=None) == []


def test_count_over_evicts_lru_with_reason_capacity() -> None:
    entries = [_entry("a", 1), _entry("b", 1), _entry("c", 1)]
    assert _ids(plan_room(entries, _new(1), max_models=2, budget=None)) == [
        ("a", "capacity"),
        ("b", "capacity"),
    ]


def test_bytes_over_evicts_lru_with_reason_memory() -> None:
    entries = [_entry("a", 100), _entry("b", 300), _entry("c", 100)]
    assert _ids(plan_room(entries, _new(200), max_models=10, budget=500)) == [
        ("a", "memory"),
        ("b", "memory"),
    ]


def test_count_then_bytes_reasons() -> None:
    entries = [_entry("a", 10), _entry("b", 10), _entry("c", 400)]
    # One over the count (a goes for capacity), then still 10 bytes over (b goes for memory).
    assert _ids(plan_room(entries, _new(110), max_models=3, budget=510)) == [
        ("a", "capacity"),
        ("b", "memory"),
    ]


def test_models_in_use_loading_or_not_admitted_are_never_victims() -> None:
    entries = [
        _entry("used", 1, refs=1),
        _entry("loading", 1, state=EntryState.LOADING),
        _entry("idle", 1),
    ]
    waiting = _entry("waiting", 1, state=EntryState.ADMITTING)  # waiting for room itself: takes none
    assert _ids(plan_room([*entries, waiting], _new(1), max_models=3, budget=None)) == [("idle", "capacity")]
    assert plan_room([*entries, waiting], _new(1), max_models=2, budget=None) is None


def test_pinned_models_go_last() -> None:
    entries = [_entry("p", 1, pinned=True), _entry("a", 1), _entry("b", 1)]
    assert _ids(plan_room(entries, _new(1), max_models=2, budget=None)) == [
        ("a", "capacity"),
        ("b", "capacity"),
    ]
    assert _ids(plan_room(entries, _new(1), max_models=1, budget=None)) == [
        ("a", "capacity"),
        ("b", "capacity"),
        ("p", "capacity"),
    ]


def test_unloads_under_way_are_waited_for_not_doubled() -> None:
    entries = [_entry("leaving", 100, state=EntryState.EVICTING), _entry("a", 100)]
    assert plan_room(entries, _new(100), max_models=2, budget=None) is None
    # Not enough with the unload alone: evict more, counting the unload's share.
    assert _ids(plan_room(entries, _new(100), max_models=1, budget=None)) == [("a", "capacity")]


def test_insufficient_candidates_evict_nothing() -> None:
    entries = [_entry("a", 100), _entry("used", 400, refs=1)]
    assert plan_room(entries, _new(200), max_models=None, budget=500) is None


def test_trim_without_a_new_model() -> None:
    entries = [_entry("a", 100), _entry("b", 450, refs=1)]
    assert _ids(plan_room(entries, None, max_models=None, budget=500)) == [("a", "memory")]
