"""The entry's state machine and the table: legal transitions only, and the table holds exactly
the live entries; the facts that are derived (admitted, pinned, footprint, handle) follow."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from earshot.cache.entry import (
    ADMITTED_STATES,
    LIVE,
    TRANSITIONS,
    Entry,
    EntryState,
    IllegalTransition,
    Table,
)
from earshot.cache.lease import Lease
from tests.support.fakes import FakeBackend, make_entry, make_spec

S = EntryState


def _fresh(table: Table, *, fetch: bool = False, model_id: str = "a") -> Entry:
    loop = asyncio.new_event_loop()
    try:
        return table.create(make_spec(model_id), FakeBackend(), now=5.0, fetch=fetch, loop=loop)
    finally:
        loop.close()


def test_a_new_entry_starts_downloading_or_admitting_and_is_in_the_table() -> None:
    table = Table()
    entry = _fresh(table, fetch=True)
    assert entry.state is S.DOWNLOADING
    assert entry in table
    assert table.get("a") is entry
    other = _fresh(table, model_id="b")
    assert other.state is S.ADMITTING
    assert len(table) == 2


def test_one_live_entry_per_id() -> None:
    table = Table()
    _fresh(table)
    with pytest.raises(IllegalTransition):
        _fresh(table)


def test_the_happy_path_and_the_table() -> None:
    table = Table()
    entry = make_entry("a", 10, state=S.ADMITTING, table=table)
    for state in (S.LOADING, S.LOADED, S.EVICTING):
        entry.to(state)
        assert entry in table
    entry.to(S.GONE)
    assert entry not in table
    assert table.get("a") is None
    assert len(table) == 0


@pytest.mark.parametrize("start", [S.DOWNLOADING, S.ADMITTING, S.LOADING])
def test_failing_takes_the_entry_out(start: EntryState) -> None:
    table = Table()
    entry = _fresh(table, fetch=True)
    path = {S.DOWNLOADING: [], S.ADMITTING: [S.ADMITTING], S.LOADING: [S.ADMITTING, S.LOADING]}[start]
    for state in path:
        entry.to(state)
    entry.to(S.FAILED)
    assert entry not in table


def test_every_transition_outside_the_table_raises_and_changes_nothing() -> None:
    """All 49 pairs: the allowed ones work, every other one raises and leaves state and table as they were."""
    reach = {
        S.DOWNLOADING: [],
        S.ADMITTING: [S.ADMITTING],
        S.LOADING: [S.ADMITTING, S.LOADING],
        S.LOADED: [S.ADMITTING, S.LOADING, S.LOADED],
        S.EVICTING: [S.ADMITTING, S.LOADING, S.LOADED, S.EVICTING],
        S.GONE: [S.ADMITTING, S.GONE],
        S.FAILED: [S.FAILED],
    }
    allowed = 0
    for source, target in itertools.product(EntryState, EntryState):
        table = Table()
        entry = _fresh(table, fetch=True)
        for state in reach[source]:
            entry.to(state)
        assert entry.state is source
        if target in TRANSITIONS[source]:
            entry.to(target)
            allowed += 1
            assert (entry in table) == (target in LIVE)
        else:
            with pytest.raises(IllegalTransition):
                entry.to(target)
            assert entry.state is source
            assert (entry in table) == (source in LIVE)
    assert allowed == 10  # the diagram in entry.py, no more


def test_terminal_states_are_final() -> None:
    assert TRANSITIONS[S.GONE] == TRANSITIONS[S.FAILED] == frozenset()


def test_derived_facts() -> None:
    table = Table()
    entry = make_entry("a", 100, state=S.ADMITTING, table=table)
    assert not entry.admitted
    assert entry.loading
    assert entry.phase == "waiting"
    assert entry.footprint_bytes == 100
    assert not entry.measured
    assert not entry.pinned
    table.pins["a"] = True
    assert entry.pinned
    entry.to(S.LOADING)
    assert entry.admitted
    assert entry.phase == "loading"
    entry.to(S.LOADED)
    entry.footprint = {"cpu": 70, "cuda:0": 50}
    assert entry.footprint_bytes == 120
    assert entry.measured
    assert entry.handle is None
    entry.lease = Lease(entry.spec, "the handle", "hit")
    assert entry.handle == "the handle"
    assert entry.idle
    assert entry.phase is None
    assert not entry.loading
    entry.refs = 1
    assert not entry.idle
    assert {s for s in EntryState if s in ADMITTED_STATES} == {S.LOADING, S.LOADED, S.EVICTING}


def test_a_spec_pin_stands_until_a_pin_is_set() -> None:
    table = Table()
    loop = asyncio.new_event_loop()
    try:
        entry = table.create(make_spec("p", pin=True), FakeBackend(), now=0.0, fetch=False, loop=loop)
    finally:
        loop.close()
    assert entry.pinned
    table.pins["p"] = False
    assert not entry.pinned


def test_touch_orders_least_recently_used_first() -> None:
    table = Table()
    a = make_entry("a", 1, table=table)
    b = make_entry("b", 1, table=table)
    assert list(table.values()) == [a, b]
    table.touch(a)
    assert list(table.values()) == [b, a]
    assert list(table.most_recent_first()) == [a, b]
