"""GET /metrics: the Prometheus exposition (cache, inference, GPU, HTTP, process).

Public (no API key) and left out of the OpenAPI schema. A scrape holds the event loop only for
`take()` (the cache's snapshot: its table may only be read on the loop); `render(taken)` (every
collector, `/proc` reads, prometheus_client's text formatting, about 10 µs of CPU per sample) runs
in a worker thread, so a large catalog's scrape does not stall other requests (bench/README.md,
`metrics`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CONTENT_TYPE_LATEST

T = TypeVar("T")


def metrics_handler(
    take: Callable[[], T],
    render: Callable[[T], bytes],
    run: Callable[[Callable[[T], bytes], T], Awaitable[bytes]],
) -> HTTPRouteHandler:
    """The GET /metrics route handler: `take()` on the loop, `render` through `run` (a worker)."""

    @get("/metrics", opt={"public": True}, include_in_schema=False, name="metrics")
    async def metrics() -> Response[bytes]:
        body = await run(render, take())
        # content-type set as is: Litestar would append a second "; charset=utf-8" to a text/ type.
        return Response(
            body,
            media_type=CONTENT_TYPE_LATEST,
            headers={"content-type": CONTENT_TYPE_LATEST, "cache-control": "no-store"},
        )

    handler: Any = metrics
    return handler  # type: ignore[no-any-return]
