"""Optional API key: when `api_key` is set, every route but the public ones (/health, /metrics)
needs `Authorization: Bearer <key>`. Compared in constant time."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler


def api_key_guard(expected: str) -> Any:
    expected_bytes = expected.encode()

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("public"):
            return
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected_bytes):
            raise NotAuthorizedException(
                "Missing or invalid API key: send 'Authorization: Bearer <key>'."
                if header
                else "An API key is required: send 'Authorization: Bearer <key>'."
            )

    return guard
