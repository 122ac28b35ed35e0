"""The last N cache events, as JSON-able records, and live subscriptions to new ones.

`EventLog` is a cache `Observer`. Each event becomes a record
`{"id": seq, "event": kind, "model", "task", "at": ISO-8601 UTC, ...the event's own fields}`, with
`id` a sequence number (1, 2, ...) that never repeats within the process. The ring buffer keeps the
newest `size` records, oldest first. `GET /api/events` serves it; `?stream=true` subscribes.

Cache hits are not buffered: under steady traffic they would push the loads and evictions that
operators look for out of the ring. They stay countable (`earshot_cache_requests_total`), and a
subscription made with `hits=True` (`?stream=true&hits=true`, `earshot ps --watch --hits`) receives
them live.

Subscriptions are bounded queues: a slow client never blocks the cache. When its queue is full,
new records are dropped for that subscriber and counted; the subscriber then receives one
`Gap(dropped=n)` marker, in order, before the next record it does get.

Events are published on the event loop thread (the cache's observers run there).

`close()` ends every subscription (each gets `END` after what it has queued), so live streams can
finish when the server shuts down instead of holding the shutdown until they are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol, overload

from earshot.cache.events import CacheEvent, Hit

Record = dict[str, Any]
DEFAULT_QUEUE_SIZE = 256
_BASE_FIELDS = frozenset({"model", "task", "at"})


@overload
def iso_utc(ts: float) -> str: ...
@overload
def iso_utc(ts: float | None) -> str | None: ...
def iso_utc(ts: float | None) -> str | None:
    """Wall-clock seconds as ISO-8601 UTC with milliseconds (the format of /api/ps too); None for no
    time or one no calendar can show (a far-future expiry)."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


class Recordable(Protocol):
    """What becomes a record: a frozen dataclass with `kind`, `model`, `task` and `at` (a cache
    event, or a realtime session event of `earshot.session_events`)."""

    @property
    def kind(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def task(self) -> str: ...

    @property
    def at(self) -> float: ...


def event_record(event: CacheEvent | Recordable, seq: int) -> Record:
    """The JSON-able record of one event (`id`, `event`, `model`, `task`, `at`, then its fields)."""
    record: Record = {
        "id": seq,
        "event": event.kind,
        "model": event.model,
        "task": event.task,
        "at": iso_utc(event.at),
    }
    for f in dataclasses.fields(event):  # type: ignore[arg-type]
        if f.name not in _BASE_FIELDS:
            record[f.name] = _jsonable(getattr(event, f.name))
    return record


@dataclasses.dataclass(frozen=True)
class Gap:
    """`dropped` records were not delivered to this subscriber (its queue was full)."""

    dropped: int


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()  # the last item of a subscription: the event log was closed
Item = Record | Gap | _End


class Subscription:
    """A live feed of new records; iterate with `await get()`. Close it (or use `with`) when done."""

    def __init__(self, log: EventLog, maxsize: int, *, hits: bool = False) -> None:
        self._log = log
        self.hits = hits
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._maxsize = maxsize
        self._dropped = 0
        self.closed = False

    @property
    def dropped(self) -> int:
        """Records dropped and not yet reported by a Gap."""
        return self._dropped

    def offer(self, record: Record) -> None:
        """Queue `record`, or count it as dropped when the queue is full. Loop thread only."""
        queue = self._queue
        if self._dropped:
            if queue.qsize() >= self._maxsize:
                self._dropped += 1
                return
            queue.put_nowait(Gap(self._dropped))
            self._dropped = 0
        if queue.qsize() >= self._maxsize:
            self._dropped += 1
            return
        queue.put_nowait(record)

    def finish(self) -> None:
        """Queue END after everything already queued (it never counts against the bound)."""
        self._queue.put_nowait(END)

    async def get(self) -> Item:
        return await self._queue.get()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._log._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventLog:
    """Ring buffer of the last `size` event records plus live subscriptions (a cache Observer)."""

    def __init__(self, size: int, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if size < 1:
            raise ValueError("the events buffer holds at least one event")
        self._buffer: deque[Record] = deque(maxlen=size)
        self._seq = itertools.count(1)
        self._last = 0
        self._queue_size = queue_size
        self._subscribers: list[Subscription] = []
        self._closed = False

    @property
    def size(self) -> int:
        return self._buffer.maxlen or 0

    @property
    def last_id(self) -> int:
        """The id of the newest record (0 before the first)."""
        return self._last

    def __call__(self, event: CacheEvent | Recordable) -> None:
        hit = isinstance(event, Hit)
        if hit and not any(sub.hits for sub in self._subscribers):
            return  # nobody follows hits: no record at all (the hit path stays cheap)
        seq = next(self._seq)
        record = event_record(event, seq)
        self._last = seq
        if not hit:
            self._buffer.append(record)
        for sub in tuple(self._subscribers):
            if sub.hits or not hit:
                sub.offer(record)

    def publish(self, record: Record) -> None:
        """A record made elsewhere (a fleet worker's event, relayed by the gateway): buffered and
        sent to subscribers like one of this log's own, under an id of this log's sequence."""
        seq = next(self._seq)
        record = {**record, "id": seq}
        self._last = seq
        self._buffer.append(record)
        for sub in tuple(self._subscribers):
            sub.offer(record)

    def recent(self, limit: int | None = None, *, after: int | None = None) -> list[Record]:
        """The buffered records, oldest first: the newest `limit`, and only those with id > `after`."""
        records = list(self._buffer)
        if after is not None:
            records = [r for r in records if r["id"] > after]
        if limit is not None:
            records = records[-limit:] if limit > 0 else []
        return records

    def subscribe(self, *, queue_size: int | None = None, hits: bool = False) -> Subscription:
        """A feed of the records published from now on (call on the event loop that will read it);
        with `hits`, cache hits too."""
        sub = Subscription(self, self._queue_size if queue_size is None else queue_size, hits=hits)
        if self._closed:
            sub.finish()
        else:
            self._subscribers.append(sub)
        return sub

    def close(self) -> None:
        """End every subscription, now and later (the buffer stays readable). Idempotent."""
        self._closed = True
        for sub in tuple(self._subscribers):
            sub.finish()

    def reopen(self) -> None:
        """Accept subscriptions again after `close()` (an app started a second time)."""
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(sub)
