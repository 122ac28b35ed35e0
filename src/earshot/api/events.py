"""GET /api/events: the recent cache events, or (`?stream=true`) new ones as Server-Sent Events.

JSON: `{"events": [...]}`, oldest first, each `{"id", "event", "model", "task", "at", ...}`
(`earshot.observability.events.event_record`); `?limit=N` keeps the newest N, `?after=ID` only
those newer than ID.

Cache hits are left out of the buffer (steady traffic would push the loads and evictions out of
it); `?stream=true&hits=true` follows them live.

Stream: one SSE message per event (`id:` = the event id, `data:` = the record as JSON), a comment
every `keepalive` seconds so proxies keep the connection open, and replay of the buffered events
newer than `Last-Event-ID` (or `?after=`) on (re)connect. Each client has a bounded queue: a
client that reads too slowly loses events rather than slowing the cache, and is told so by a
message `{"event": "events_dropped", "dropped": N}` where the gap is. The stream ends when the event
log is closed (`EventLog.close()`, at shutdown).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Response, Router, get
from litestar.di import NamedDependency, Provide
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from earshot.observability.events import END, EventLog, Gap, Record

KEEPALIVE_SECONDS = 15.0
RETRY_MS = 3000


def _message(record: Record) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=json.dumps(record, separators=(",", ":")), id=record["id"])


async def event_stream(
    log: EventLog, *, after: int | None, keepalive: float, hits: bool = False
) -> AsyncIterator[ServerSentEventMessage]:
    """SSE messages: a hello comment, the buffered events newer than `after`, then live events
    (with `hits`, cache hits too: they are never buffered)."""
    with log.subscribe(hits=hits) as sub:
        yield ServerSentEventMessage(comment="earshot cache events", retry=RETRY_MS, data=None)
        last = 0
        if after is not None:
            for record in log.recent(after=after):
                yield _message(record)
                last = record["id"]
        while True:
            try:
                item = await asyncio.wait_for(sub.get(), keepalive)
            except TimeoutError:
                yield ServerSentEventMessage(comment="keepalive", data=None)
                continue
            if item is END:  # the server is shutting down
                return
            if isinstance(item, Gap):
                gap = {"event": "events_dropped", "dropped": item.dropped}
                yield ServerSentEventMessage(data=json.dumps(gap, separators=(",", ":")))
            elif isinstance(item, dict) and item["id"] > last:  # replayed already otherwise
                yield _message(item)
                last = item["id"]


def _last_event_id(header: str | None, after: int | None) -> int | None:
    if after is not None:
        return after
    if header is not None and header.strip().isdigit():
        return int(header.strip())
    return None


class EventsController(Controller):
    path = "/api/events"
    tags = ["cache"]  # noqa: RUF012 - Litestar's declared attribute

    @get("/", summary="Recent cache events; ?stream=true follows new ones as Server-Sent Events")
    async def events(
        self,
        event_log: NamedDependency[EventLog],
        sse_keepalive: NamedDependency[float],
        stream: Annotated[
            bool, QueryParameter(description="Follow new events as Server-Sent Events")
        ] = False,
        hits: Annotated[
            bool,
            QueryParameter(
                description="With stream=true: also each cache hit, live (hits are never buffered)"
            ),
        ] = False,
        limit: Annotated[int | None, QueryParameter(ge=1, description="Only the newest N events")] = None,
        after: Annotated[
            int | None, QueryParameter(ge=0, description="Only events with a greater id")
        ] = None,
        last_event_id: Annotated[
            str | None, HeaderParameter(name="last-event-id", required=False, max_length=32)
        ] = None,
    ) -> Response[dict[str, Any]] | ServerSentEvent:
        if stream:
            since = _last_event_id(last_event_id, after)
            return ServerSentEvent(event_stream(event_log, after=since, keepalive=sse_keepalive, hits=hits))
        return Response({"events": event_log.recent(limit, after=after)})


def events_router(event_log: EventLog, *, keepalive: float = KEEPALIVE_SECONDS) -> Router:
    """GET /api/events serving `event_log`."""
    return Router(
        path="/",
        route_handlers=[EventsController],
        dependencies={
            "event_log": Provide(lambda: event_log, use_cache=True, sync_to_thread=False),
            "sse_keepalive": Provide(lambda: keepalive, use_cache=True, sync_to_thread=False),
        },
    )
