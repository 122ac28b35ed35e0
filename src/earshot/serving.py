"""uvicorn's HTTP protocol (httptools) with a bound on the request head: 431 before it is read whole.

httptools (llhttp) has no limit on the size of a request's headers, nor on their number, and uvicorn
adds none: a 100 MB `Authorization` header is buffered whole and handed to the app. An ASGI
middleware only sees headers once the server has parsed them all, so the bound lives here, in the
protocol: the bytes received while the head of a request is incomplete are counted, and the
headers parsed; past `max_header_bytes` or `max_headers` the connection gets `431 Request Header
Fields Too Large` (the OpenAI error envelope) and is closed. What is buffered before the refusal is
at most the limit plus one read from the socket.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HeadLimitedProtocol", "head_limited_protocol"]


def _body(message: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "headers_too_large"}
    return json.dumps({"error": error}).encode()


class HeadLimitedProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` refusing request heads over `max_header_bytes` bytes or `max_headers` headers."""

    max_header_bytes = 64 * 1024
    max_headers = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._header_count = 0
        self._parsed = 0  # bytes of the request line and headers parsed so far
        self._refusal: str | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._parsed = 0

    def _refuse(self, message: str) -> None:
        self._refusal = message
        raise ValueError(message)  # httptools stops parsing; send_400_response then sends the 431

    def on_url(self, url: bytes) -> None:
        self._parsed += len(url)
        if self._parsed > self.max_header_bytes:
            self._refuse(self._too_large())
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._parsed += len(name) + len(value) + 4
        if self._header_count > self.max_headers:
            self._refuse(f"More than {self.max_headers} request headers; send fewer.")
        if self._parsed > self.max_header_bytes:
            self._refuse(self._too_large())
        super().on_header(name, value)

    def _too_large(self) -> str:
        return f"The request line and headers are over {self.max_header_bytes} bytes; send less."

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        counting = self._in_head
        if counting:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refusal is None and counting and self._in_head and self._head_bytes > self.max_header_bytes:
            # The head is still not complete after more than the limit: refuse without reading on.
            self._refusal = self._too_large()
            self.send_400_response(self._refusal)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
            return
        if self.transport.is_closing():
            return
        body = _body(self._refusal)
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
        )
        self.logger.warning("request refused: %s", self._refusal)
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def head_limited_protocol(max_header_bytes: int, max_headers: int) -> type[HeadLimitedProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with these limits."""
    return type(
        "HeadLimitedProtocol",
        (HeadLimitedProtocol,),
        {"max_header_bytes": max_header_bytes, "max_headers": max_headers},
    )
