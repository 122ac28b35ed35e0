"""GET /health (liveness and readiness) and GET /api/config (effective settings and their sources)."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from earshot import __version__
from earshot.api.errors import ERROR_RESPONSES
from earshot.api.services import Services


@get("/health", opt={"public": True}, tags=["system"], summary="Liveness (always 200) and readiness")
async def health(services: Services) -> dict[str, Any]:
    """200 while the process serves. `ready` turns true once every preload finished (loaded or failed)."""
    return {"status": "ok", "ready": services.inference.ready, "version": __version__}


@get("/health/ready", opt={"public": True}, tags=["system"], summary="Readiness: 200 once preloads are done")
async def ready(services: Services) -> Response[dict[str, Any]]:
    is_ready = services.inference.ready
    return Response(
        {"status": "ready" if is_ready else "starting", "ready": is_ready},
        status_code=HTTP_200_OK if is_ready else HTTP_503_SERVICE_UNAVAILABLE,
    )


@get(
    "/api/config",
    tags=["system"],
    responses=ERROR_RESPONSES,
    summary="Effective settings, each with its source (secrets redacted)",
)
async def config(services: Services) -> dict[str, Any]:
    return {"settings": services.settings.effective()}
