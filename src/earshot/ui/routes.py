"""Routes of the console: GET /ui (the page and its files), GET / (redirect to it) and
GET /ui/auth.json (whether the page must ask for an API key).

These routes are public (`opt={"public": True}`, see `earshot.api.auth`): they hold nothing but
the page's own code. Everything the page shows comes from the API, which the key guards. Each
answer carries a strict Content-Security-Policy: scripts, styles and fetches from this origin
only, no inline code, no frames, no plugins, media from this origin or from blobs the page made
(the synthesized speech).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from litestar import Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

PATH = "/ui"
PUBLIC: dict[str, Any] = {"public": True}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
}


def static_dir() -> Path:
    """The page's files, inside the installed package."""
    return Path(str(resources.files("earshot.ui") / "static"))


def _secure(response: Any) -> Any:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


@get("/", opt=PUBLIC, include_in_schema=False)
async def root() -> Redirect:
    """The server's root opens the console."""
    return Redirect(PATH + "/", headers=SECURITY_HEADERS)


def ui_router(*, api_key_required: bool) -> Router:
    """The console's routes. `api_key_required`: the page asks for the key before anything else."""

    @get(f"{PATH}/auth.json", opt=PUBLIC, include_in_schema=False)
    async def auth() -> Response[dict[str, bool]]:
        return Response({"api_key_required": api_key_required}, headers=SECURITY_HEADERS)

    files = create_static_files_router(
        path=PATH,
        directories=[static_dir()],
        html_mode=True,
        name="ui",
        opt=PUBLIC,
        # Revalidate every time (ETag / Last-Modified): an upgraded server serves its own page.
        cache_control=CacheControlHeader(no_cache=True),
        after_request=_secure,
        include_in_schema=False,
    )
    return Router(path="/", route_handlers=[root, auth, files])
