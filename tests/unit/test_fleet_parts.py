"""The fleet's parts that need no Ray: errors across the boundary, the board's bookkeeping."""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest

from earshot.api.errors import from_exception
from earshot.backends.errors import UnknownVoice, UnsupportedLanguage
from earshot.fleet.board import Board
from earshot.fleet.errors import Remote, WorkerLost, to_remote
from earshot.inference.errors import CacheBusy, CacheFull, ModelLoadError, ModelLoadTimeout, UnknownModel
from earshot.models.errors import CatalogFull, HubUnreachable


@pytest.mark.parametrize(
    "error",
    [
        UnknownModel("model 'x' is not in the catalog", model="x"),
        ModelLoadTimeout("loading m took longer than 5s", model="m"),
        ModelLoadError("bad files", model="m"),
        CacheFull("no room for m", model="m"),
        CacheBusy("256 requests wait", model="m"),
        UnknownVoice("nope", ["alloy", "echo"]),
        UnsupportedLanguage("model 'm' is English-only; language 'fr' is not supported"),
        CatalogFull("max_catalog_models reached", model="a/b"),
        HubUnreachable("the Hub cannot be reached", model="a/b"),
        WorkerLost("the worker went away", model="m"),
    ],
)
def test_an_error_crosses_pickled_and_maps_as_the_original(error: Exception) -> None:
    remote = to_remote(error)
    assert remote is not None
    back = pickle.loads(pickle.dumps(remote))
    assert isinstance(back, Remote)
    rebuilt = back.rebuild()
    want, got = from_exception(error), from_exception(rebuilt)
    assert (got.status, got.code, got.message, got.param, got.headers) == (
        want.status,
        want.code,
        want.message,
        want.param,
        want.headers,
    )


def test_other_errors_are_left_alone() -> None:
    assert to_remote(RuntimeError("a bug")) is None


async def test_the_board_tracks_workers_events_and_losses() -> None:
    board = Board(lost_after=60)
    await board.register("w1", "127.0.0.1", 11)
    await board.register("w2", "127.0.0.1", 12)
    assert await board.push("w1", [{"event": "model_loaded", "model": "m", "task": "t", "at": "x"}], [], 0)
    records = await board.wait_events(0, 0.1)
    assert [(r["event"], r["worker"]) for r in records] == [
        ("worker_started", "w1"),
        ("worker_started", "w2"),
        ("model_loaded", "w1"),
    ]
    assert [r["id"] for r in records] == [1, 2, 3]
    assert await board.wait_events(3, 0.05) == []
    waiter = asyncio.ensure_future(board.wait_events(3, 5))
    await asyncio.sleep(0.01)
    await board.push("w2", [{"event": "model_evicted", "model": "m", "task": "t", "at": "x"}], [], 1)
    assert [r["event"] for r in await waiter] == ["model_evicted"]

    lost = board.reap(now=time.monotonic() + 61)
    assert sorted(lost) == ["w1", "w2"]
    status = await board.status()
    assert status["workers"] == []
    assert (status["starts"], status["losses"]) == (2, 2)
    assert not await board.push("w1", [], [], 0)  # a lost worker is told to register again
