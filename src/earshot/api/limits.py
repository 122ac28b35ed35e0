"""An ASGI middleware around every HTTP request: body limits per route, cancellation when the client
leaves, and the end of requests still running when the shutdown grace is over.

- **Body limits**: each route has a limit that fits what it can accept (the speech JSON: its text at
  `max_input_chars`, in the worst JSON escaping, plus room for the other fields; the uploads:
  `max_upload_bytes` plus the multipart overhead; anything else a small JSON body). A
  `Content-Length` over it is refused with 413 before a byte of the body is read; a chunked body is
  counted as it arrives and refused the moment it passes the limit.
- **Client gone**: Litestar and uvicorn do not cancel a non-streaming handler when its client
  disconnects; it would go on waiting for a model, loading it and running inference for nobody.
  Once the body is read, this middleware watches `receive()` for `http.disconnect` and cancels the
  handler (an anyio cancel scope): a request waiting in the cache's queue leaves it, one in a
  decode stops waiting for it. The handler's own later `receive()` calls (a streaming response
  listens for the disconnect too) get the disconnect from here.
- **Shutdown**: `begin_shutdown(grace)` (called by `earshot serve` on SIGTERM/SIGINT) gives the
  requests in flight `grace` seconds; those still running then are cancelled, and get 503
  `shutting_down` in the OpenAI envelope with `Retry-After` when their response has not started
  (a stalled upload among them: its connection is closed after the 503). A request uvicorn cancels
  itself (its own graceful-shutdown timeout) gets the same 503, and nothing is logged as an error.

Errors sent from here use the OpenAI envelope, as the app's own handlers do.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

log = logging.getLogger("earshot.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_SECONDS = 5
# Bodies of routes with no limit of their own (model management: small JSON objects).
DEFAULT_BODY_LIMIT = 64 * 1024
# JSON text of one character at worst: a `\uXXXX\uXXXX` surrogate pair for one code point.
JSON_BYTES_PER_CHAR = 12
SPEECH_FIELDS_SLACK = 64 * 1024
SHUTTING_DOWN = "The server is shutting down; retry on another instance or once it is back."


def speech_body_limit(max_input_chars: int) -> int:
    """The largest JSON body of a speech request that can hold `max_input_chars` characters."""
    return max_input_chars * JSON_BYTES_PER_CHAR + SPEECH_FIELDS_SLACK


def error_body(status: int, message: str, code: str, *, type: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


@dataclass(eq=False)
class _Request:
    scope: anyio.CancelScope
    started: bool = False  # http.response.start sent
    finished: bool = False  # the last body chunk sent
    taken: bool = False  # the response is this middleware's (an error it sent): the app's is dropped
    why: str | None = None  # "disconnect", "shutdown", "too_large": why it was cancelled

    async def answer(self, send: Send, status: int, message: str, code: str) -> None:
        """Send an error now if no response has started; end a started one (a stream) cleanly."""
        if self.taken or self.finished:
            return
        self.taken = True
        with _suppress():
            if not self.started:
                await _send_error(send, status, message, code, retry=status == 503)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.finished = True


@dataclass(eq=False)
class RequestLimits:
    """The limits and the requests in flight, shared by every route; `middleware` is the factory
    for Litestar's `middleware=` (Litestar builds one instance per route)."""

    body_limits: Mapping[str, int] = field(default_factory=dict)  # path -> bytes
    default_body_limit: int = DEFAULT_BODY_LIMIT
    _inflight: set[_Request] = field(default_factory=set)
    _closing: bool = False
    _ended: anyio.Event | None = None  # set at the end of the shutdown grace
    _timer: asyncio.TimerHandle | None = None

    def middleware(self, app: Any) -> Any:  # Litestar's ASGIApp in, ASGIApp out
        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            await self.handle(app, scope, receive, send)

        return limited

    def body_limit(self, path: str) -> int:
        return self.body_limits.get(path.rstrip("/") or "/", self.default_body_limit)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- shutdown ------------------------------------------------------------------------------

    def begin_shutdown(self, grace: float) -> None:
        """Call on the event loop when the server starts to stop: requests still running after
        `grace` seconds are ended (503 where their response has not started)."""
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, grace), self.end_all)

    def end_all(self) -> None:
        if self._ended is not None:
            self._ended.set()

    # -- the middleware ------------------------------------------------------------------------

    async def handle(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        limit = self.body_limit(str(scope.get("path", "")))
        length = _content_length(scope)
        if length is not None and length > limit:
            await _send_error(send, 413, _too_large(limit), "request_too_large")
            return
        if self._closing:
            await _send_error(send, 503, SHUTTING_DOWN, "shutting_down", retry=True)
            return
        if self._ended is None:
            self._ended = anyio.Event()
        request = _Request(anyio.CancelScope())
        self._inflight.add(request)
        try:
            await self._serve(app, request, scope, receive, send, limit)
        except asyncio.CancelledError:
            # uvicorn's own graceful-shutdown timeout cancels what still runs: the client has its
            # answer already (503 at the grace) or gets it now; no traceback, no plain-text 500.
            with anyio.CancelScope(shield=True):
                await request.answer(send, 503, SHUTTING_DOWN, "shutting_down")
        finally:
            self._inflight.discard(request)

    async def _serve(
        self, app: ASGIApp, request: _Request, scope: Scope, receive: Receive, send: Send, limit: int
    ) -> None:
        received = 0
        body_done = False
        gone = anyio.Event()
        ended = self._ended
        assert ended is not None

        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not request.finished and request.why is None:
                        request.why = "disconnect"
                        request.scope.cancel()

            async def at_grace() -> None:
                await ended.wait()
                if request.finished or request.why is not None:
                    return
                request.why = "shutdown"
                request.scope.cancel()  # first: the handler must not see the 503 end its receive()
                # Answer now: the handler may take a moment to stop (an inference ends at its
                # next segment), and the client should not wait for that.
                with anyio.CancelScope(shield=True):
                    await request.answer(send, 503, SHUTTING_DOWN, "shutting_down")

            async def inner_receive() -> Message:
                nonlocal received, body_done
                if body_done:
                    await gone.wait()
                    return {"type": "http.disconnect"}
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        request.why = "too_large"
                        request.scope.cancel()
                        with anyio.CancelScope(shield=True):
                            await request.answer(send, 413, _too_large(limit), "request_too_large")
                        await anyio.lowlevel.checkpoint()  # raises the cancellation, past Litestar
                    if not message.get("more_body", False):
                        body_done = True
                        tg.start_soon(watch)
                elif message["type"] == "http.disconnect":
                    gone.set()
                    body_done = True
                return message

            async def inner_send(message: Message) -> None:
                if request.taken:
                    return  # answered from here already (503 at the grace, 413): the app's is dropped
                if message["type"] == "http.response.start":
                    request.started = True
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    request.finished = True
                await send(message)

            tg.start_soon(at_grace)
            with request.scope:
                try:
                    await app(scope, inner_receive, inner_send)
                except Exception:
                    if not request.taken:
                        raise
                    # What the handler raised on its way out after this middleware answered (its
                    # body cut short by the 503) is no error of the server.
                    log.debug("request ended after its answer was sent", exc_info=True)
            tg.cancel_scope.cancel()

        if request.why == "disconnect":
            log.info("client disconnected: request cancelled", extra={"path": scope.get("path")})
        elif request.why == "shutdown":
            log.info("request ended by shutdown", extra={"path": scope.get("path")})


class _suppress:
    """Sending to a client that is already gone (or a closed transport) is not an error here."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        return kind is not None and issubclass(kind, Exception)


def _too_large(limit: int) -> str:
    return (
        f"Request body over this route's limit of {limit} bytes "
        "(max_upload_bytes for audio uploads, max_input_chars for speech)."
    )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, status: int, message: str, code: str, *, retry: bool = False) -> None:
    body = error_body(
        status, message, code, type="server_error" if status >= 500 else "invalid_request_error"
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry:
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    if status in (413, 503):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
