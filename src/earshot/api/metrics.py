"""GET /metrics: the Prometheus exposition of one registry (cache, inference, GPU, HTTP, process).

Public (no API key) and left out of the OpenAPI schema. The handler runs on the event loop thread
on purpose (`sync_to_thread=False`): the cache-state collector reads `cache.snapshot()`, which may
only be read on the loop, and the scrape itself is cheap (GPU values come from the NVML sampler's
last sample, never from NVML).
"""

from __future__ import annotations

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def metrics_handler(registry: CollectorRegistry) -> HTTPRouteHandler:
    """The GET /metrics route handler serving `registry`."""

    @get(
        "/metrics",
        opt={"public": True},
        include_in_schema=False,
        sync_to_thread=False,
        name="metrics",
    )
    def metrics() -> Response[bytes]:
        # content-type set as is: Litestar would append a second "; charset=utf-8" to a text/ type.
        return Response(
            generate_latest(registry),
            media_type=CONTENT_TYPE_LATEST,
            headers={"content-type": CONTENT_TYPE_LATEST, "cache-control": "no-store"},
        )

    return metrics
