"""`GET /v1/realtime?intent=transcription`: the WebSocket of realtime transcription sessions.

The handshake is always accepted, so that a refusal reaches the client as a close code with a
reason it can read (a refused handshake is a bare HTTP 403 to a WebSocket client):

- auth (when `api_key` is set): `Authorization: Bearer <key>` (the `openai` SDK), or the
  subprotocol `openai-insecure-api-key.<key>` (browsers cannot set headers); else close 1008.
- `intent=transcription` is required (earshot has no conversation sessions); else close 1008.
- over `max_realtime_sessions` open: close 1013 (try again later) at once.
- a client silent for `realtime_idle_timeout` seconds: close 1000 with reason "idle".

Of the subprotocols a browser offers, `realtime` is selected (browsers fail a handshake whose
offered subprotocols all go unanswered); the key is never echoed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from litestar import WebSocket, websocket

from earshot.inference.protocol import Inference
from earshot.realtime.config import Resolve, SessionConfig, resolve_model
from earshot.realtime.events import ClientEventError, new_id
from earshot.realtime.registry import RealtimeSessions
from earshot.realtime.session import Session, SessionFailed
from earshot.realtime.vad import SileroVad
from earshot.session_events import SessionEnd, SessionEnded, SessionRefused, SessionStarted

log = logging.getLogger("earshot.realtime")

PATH = "/v1/realtime"
KEY_PROTOCOL = "openai-insecure-api-key."
DEFAULT_MODEL = "whisper-1"
MAX_REASON = 120  # bytes: a close reason must fit a control frame (123)


@dataclass(frozen=True)
class RealtimeLimits:
    max_buffer_seconds: float
    idle_timeout: float
    api_key: str | None = None


def _reason(text: str) -> str:
    return text.encode()[:MAX_REASON].decode(errors="ignore")


def _offered_key(protocols: list[str]) -> str | None:
    for protocol in protocols:
        if protocol.startswith(KEY_PROTOCOL):
            return protocol[len(KEY_PROTOCOL) :]
    return None


def _authorized(socket: WebSocket[Any, Any, Any], expected: str) -> bool:
    header = socket.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode()):
        return True
    offered = _offered_key(list(socket.scope.get("subprotocols") or []))
    return offered is not None and hmac.compare_digest(offered.encode(), expected.encode())


def _subprotocol(protocols: list[str]) -> str | None:
    if "realtime" in protocols:
        return "realtime"
    return next((p for p in protocols if not p.startswith(KEY_PROTOCOL)), None)


def realtime_handler(
    *,
    sessions: RealtimeSessions,
    inference: Inference,
    resolve: Resolve,
    limits: RealtimeLimits,
    vad: SileroVad | None = None,
) -> Any:
    """The route handler, bound to the app's sessions registry and inference service."""

    @websocket(PATH, opt={"public": True}, name="realtime")  # authenticates itself (see above)
    async def realtime(socket: WebSocket[Any, Any, Any]) -> None:
        protocols = list(socket.scope.get("subprotocols") or [])
        await socket.accept(subprotocols=_subprotocol(protocols))
        if limits.api_key is not None and not _authorized(socket, limits.api_key):
            await socket.close(
                1008,
                "Missing or invalid API key: send 'Authorization: Bearer <key>' "
                "or the subprotocol openai-insecure-api-key.<key>",
            )
            return
        if socket.query_params.get("intent") != "transcription":
            await socket.close(
                1008, "earshot serves transcription sessions only: connect with ?intent=transcription"
            )
            return
        try:
            spec = resolve_model(socket.query_params.get("model") or DEFAULT_MODEL, resolve, "model")
        except ClientEventError as exc:
            await socket.close(1008, _reason(exc.message))
            return
        session_id = new_id("sess")
        if not sessions.try_open(session_id, spec.id):
            sessions.publish(
                SessionRefused(
                    session_id=session_id, model=spec.id, at=time.time(), open_sessions=sessions.open
                )
            )
            await socket.close(
                1013,
                _reason(
                    f"{sessions.max_sessions} realtime sessions are open (max_realtime_sessions); try again later"
                ),
            )
            return
        await _serve(
            socket, session_id, spec.id, sessions, inference, resolve, limits, vad or SileroVad.load()
        )

    return realtime


async def _serve(
    socket: WebSocket[Any, Any, Any],
    session_id: str,
    model: str,
    sessions: RealtimeSessions,
    inference: Inference,
    resolve: Resolve,
    limits: RealtimeLimits,
    vad: SileroVad,
) -> None:
    lock = asyncio.Lock()
    gone = False

    async def send(text: str) -> None:
        nonlocal gone
        if gone:
            return
        async with lock:
            try:
                await socket.send_text(text)
            except Exception:  # the client went away; the receive loop sees the disconnect
                gone = True

    session = Session(
        session_id=session_id,
        config=SessionConfig(model=model),
        inference=inference,
        resolve=resolve,
        registry=sessions,
        vad=vad,
        send=send,
        max_buffer_seconds=limits.max_buffer_seconds,
    )
    started = time.perf_counter()
    sessions.publish(SessionStarted(session_id=session_id, model=model, at=time.time()))
    ended, close_code, reason = SessionEnd.CLIENT, 1000, ""
    closed_by_client = False
    try:
        await session.start()
        while True:
            try:
                message = await asyncio.wait_for(socket.receive(), timeout=limits.idle_timeout)
            except TimeoutError:
                ended, close_code = SessionEnd.IDLE, 1000
                reason = f"idle for {limits.idle_timeout:g} s (realtime_idle_timeout)"
                break
            if message["type"] == "websocket.disconnect":
                closed_by_client = True
                close_code = int(message.get("code") or 1005)
                ended = SessionEnd.SHUTDOWN if close_code == 1012 else SessionEnd.CLIENT
                break
            raw = cast("str | bytes", message.get("text") or message.get("bytes") or b"")
            try:
                await session.handle(raw)
            except SessionFailed as exc:
                await send(_error_json(exc.message, exc.code))
                ended, close_code, reason = SessionEnd.ERROR, exc.close_code, _reason(exc.message)
                break
            if gone:
                closed_by_client = True
                break
    except Exception:
        log.exception("realtime session %s failed", session_id)
        ended, close_code, reason = SessionEnd.ERROR, 1011, "internal error"
    finally:
        with contextlib.suppress(Exception):
            await session.aclose()
        sessions.close(session_id)
        sessions.publish(
            SessionEnded(
                session_id=session_id,
                model=session.config.model,
                at=time.time(),
                ended=ended,
                duration_s=time.perf_counter() - started,
                turns=session.turns,
                audio_s=session.audio_s,
                close_code=close_code,
            )
        )
        if not closed_by_client and not gone:
            with contextlib.suppress(Exception):
                await socket.close(close_code, reason)


def _error_json(message: str, code: str) -> str:
    from earshot.realtime import events as ev

    return ev.dump(ev.error(ClientEventError(message, code=code, type="server_error")))
