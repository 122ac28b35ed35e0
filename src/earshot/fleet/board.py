"""The board: one small named Ray actor that gives the gateway the whole fleet's view.

Ray Serve routes requests to replicas but does not broadcast to them, and a replica's state is its
own. So each worker registers with the board when it starts (`register`), and pushes what its cache
did (its event records) and what it holds now (its `ModelStatus` list) on every cache event, at
once, and on a heartbeat (`push`). The gateway reads the fleet's models (`status`) and follows the
fleet's events (`wait_events`, a long poll) to serve `/api/ps`, `/api/events` and its fleet metrics.

Fleet events of the board's own: `worker_started` when a worker registers (a replacement for a
dead one starts with an empty cache), `worker_lost` when a worker's heartbeat stops for
`lost_after` seconds (its models leave `/api/ps` then) or when it says it is stopping
(`worker_stopped`). Records are bounded (a ring of `size`).

The class is a plain class; `earshot.fleet.run` makes it an actor (`ray.remote(Board)`), so it
can be tested without Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from earshot.inference.protocol import ModelStatus
from earshot.observability.events import iso_utc

BOARD_NAME = "earshot-fleet-board"
HEARTBEAT_SECONDS = 1.0
LOST_AFTER_SECONDS = 5.0


@dataclass
class _Worker:
    id: str
    node: str
    pid: int
    started_at: float
    seen_at: float
    models: list[ModelStatus] = field(default_factory=list)
    waiting: int = 0


class Board:
    def __init__(self, *, size: int = 1000, lost_after: float = LOST_AFTER_SECONDS) -> None:
        self._workers: dict[str, _Worker] = {}
        self._records: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = itertools.count(1)
        self._last = 0
        self._lost_after = lost_after
        self._changed: asyncio.Event | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.starts = 0
        self.losses = 0

    # ------------------------------------------------------------------ internals

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        return self._changed

    def _append(self, record: dict[str, Any]) -> None:
        seq = next(self._seq)
        self._last = seq
        self._records.append({**record, "id": seq})
        event = self._event()
        event.set()
        self._changed = asyncio.Event()  # waiters of the old one wake; new ones wait for the next

    def _worker_record(self, kind: str, worker: _Worker, **extra: Any) -> dict[str, Any]:
        return {
            "event": kind,
            "model": None,
            "task": None,
            "at": iso_utc(time.time()),
            "worker": worker.id,
            "node": worker.node,
            "pid": worker.pid,
            **extra,
        }

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._lost_after / 2))
            self.reap()

    def reap(self, now: float | None = None) -> list[str]:
        """Forget the workers silent for `lost_after` seconds (a `worker_lost` event each)."""
        now = time.monotonic() if now is None else now
        lost = [w for w in self._workers.values() if now - w.seen_at > self._lost_after]
        for worker in lost:
            del self._workers[worker.id]
            self.losses += 1
            silent = round(now - worker.seen_at, 1)
            self._append(self._worker_record("worker_lost", worker, silent_seconds=silent))
        return [w.id for w in lost]

    # ------------------------------------------------------------------ the workers' side

    async def register(self, worker: str, node: str, pid: int) -> None:
        now = time.monotonic()
        self._event()
        entry = _Worker(worker, node, pid, started_at=time.time(), seen_at=now)
        self._workers[worker] = entry
        self.starts += 1
        self._append(self._worker_record("worker_started", entry))

    async def push(
        self, worker: str, records: list[dict[str, Any]], models: list[ModelStatus], waiting: int
    ) -> bool:
        """A worker's new event records and its current models. False when the board does not
        know the worker (it was reaped as lost): it registers again."""
        entry = self._workers.get(worker)
        if entry is None:
            return False
        entry.seen_at = time.monotonic()
        entry.models = models
        entry.waiting = waiting
        for record in records:
            self._append({**record, "worker": worker})
        if not records:
            self._event()
        return True

    async def leave(self, worker: str) -> None:
        entry = self._workers.pop(worker, None)
        if entry is not None:
            self._append(self._worker_record("worker_stopped", entry))

    # ------------------------------------------------------------------ the gateway's side

    async def status(self) -> dict[str, Any]:
        """The fleet now: every live worker's models, the requests waiting in all of them, and
        the counts of worker starts and losses since the board started."""
        self._event()
        models = [m for w in self._workers.values() for m in w.models]
        return {
            "models": models,
            "waiting": sum(w.waiting for w in self._workers.values()),
            "workers": [
                {"worker": w.id, "node": w.node, "pid": w.pid, "models": len(w.models)}
                for w in self._workers.values()
            ],
            "starts": self.starts,
            "losses": self.losses,
            "last_id": self._last,
        }

    async def wait_events(self, after: int, wait_s: float) -> list[dict[str, Any]]:
        """The records newer than `after`; when there are none, waits up to `wait_s` seconds for
        one (a long poll)."""
        newer = [r for r in self._records if r["id"] > after]
        if newer:
            return newer
        event = self._event()
        try:
            await asyncio.wait_for(event.wait(), wait_s)
        except TimeoutError:
            return []
        return [r for r in self._records if r["id"] > after]

    async def pids(self) -> dict[str, int]:
        """Each live worker's process id (tests kill one)."""
        return {w.id: w.pid for w in self._workers.values()}
