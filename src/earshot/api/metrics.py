"""GET /metrics: the Prometheus exposition of one registry (cache, inference, GPU, HTTP, process).

Public (no API key) and left out of the OpenAPI schema. The scrape is split in two: the collectors
run on the event loop thread (the cache-state collector reads `cache.snapshot()`, which may only be
read on the loop; GPU values come from the NVML sampler's last sample, never from NVML), then
prometheus_client's text formatting of what they returned runs in a worker thread. Formatting is
most of a scrape's cost (about 10 µs of CPU per sample, tens of milliseconds for a large catalog:
see bench/README.md, `metrics`), and off the loop it no longer stalls other requests.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio.to_thread
from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class _Collected(Collector):
    """Metric families already collected: what `generate_latest` formats, without collecting again."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def metrics_handler(registry: CollectorRegistry) -> HTTPRouteHandler:
    """The GET /metrics route handler serving `registry`."""

    @get(
        "/metrics",
        opt={"public": True},
        include_in_schema=False,
        name="metrics",
    )
    async def metrics() -> Response[bytes]:
        families = list(registry.collect())  # on the loop: the collectors read the cache's state
        body = await anyio.to_thread.run_sync(generate_latest, _Collected(families))
        # content-type set as is: Litestar would append a second "; charset=utf-8" to a text/ type.
        return Response(
            body,
            media_type=CONTENT_TYPE_LATEST,
            headers={"content-type": CONTENT_TYPE_LATEST, "cache-control": "no-store"},
        )

    return metrics
