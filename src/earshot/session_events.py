"""Typed events a realtime transcription session publishes (DESIGN §9), like `cache/events.py`.

Realtime metrics, log lines and `/api/events` records are observers of these; none of them keeps
a copy of the sessions' state (`earshot.realtime.registry.RealtimeSessions` is that). Observers are
called synchronously in the session's task and must be quick; one that raises is logged by the
publisher and never breaks a session.

Stdlib only and in the bottom layer (beside `earshot.types`): the realtime layer publishes them and
the observability layer below it subscribes, so neither may own them. `model` is always a catalog
id (the session resolved the client's name before), so it is safe as a metric label.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

__all__ = [
    "AudioReceived",
    "SessionEnd",
    "SessionEnded",
    "SessionEvent",
    "SessionModelChanged",
    "SessionObserver",
    "SessionRefused",
    "SessionStarted",
    "TurnCompleted",
    "TurnFailed",
]


class SessionEnd(StrEnum):
    """How a session ended: the `ended` label of `earshot_realtime_sessions_total`."""

    CLIENT = "client"  # the client closed the WebSocket (or went away)
    IDLE = "idle"  # no client event for realtime_idle_timeout seconds
    ERROR = "error"  # the server failed (the model could not be held, an unexpected error)
    SHUTDOWN = "shutdown"  # the server is stopping
    REFUSED = "refused"  # over max_realtime_sessions: closed at once, never started


@dataclass(frozen=True, kw_only=True)
class SessionEvent:
    session_id: str
    model: str  # catalog id of the session's transcription model
    at: float  # wall-clock seconds since the epoch
    task: str = "transcription"

    @property
    def kind(self) -> str:
        """Stable snake_case name, used as `event=` in logs and `/api/events`."""
        return _KINDS[type(self)]


@dataclass(frozen=True, kw_only=True)
class SessionStarted(SessionEvent):
    """A session was accepted (authenticated, within max_realtime_sessions)."""


@dataclass(frozen=True, kw_only=True)
class SessionRefused(SessionEvent):
    """A session was closed at once: max_realtime_sessions were open already."""

    open_sessions: int


@dataclass(frozen=True, kw_only=True)
class SessionModelChanged(SessionEvent):
    """`session.update` switched the session to another model (`model` is the new one)."""

    previous: str


@dataclass(frozen=True, kw_only=True)
class AudioReceived(SessionEvent):
    """Audio appended to the session's input buffer (one event per `input_audio_buffer.append`)."""

    seconds: float


@dataclass(frozen=True, kw_only=True)
class TurnCompleted(SessionEvent):
    """A turn was transcribed and its `completed` event sent."""

    item_id: str
    audio_s: float  # seconds of audio in the turn
    inference_s: float  # time in the model
    latency_s: float  # end of speech (VAD stop or commit) to the completed event sent


@dataclass(frozen=True, kw_only=True)
class TurnFailed(SessionEvent):
    """A turn could not be transcribed (its `failed` event was sent)."""

    item_id: str
    error: str


@dataclass(frozen=True, kw_only=True)
class SessionEnded(SessionEvent):
    ended: SessionEnd
    duration_s: float
    turns: int
    audio_s: float  # seconds of audio received over the session
    close_code: int


_KINDS: dict[type[SessionEvent], str] = {
    SessionStarted: "realtime_session_started",
    SessionRefused: "realtime_session_refused",
    SessionModelChanged: "realtime_session_model_changed",
    AudioReceived: "realtime_audio_received",
    TurnCompleted: "realtime_turn_completed",
    TurnFailed: "realtime_turn_failed",
    SessionEnded: "realtime_session_ended",
}


class SessionObserver(Protocol):
    """Receives every session event, synchronously. Must be quick."""

    def __call__(self, event: SessionEvent) -> None: ...
