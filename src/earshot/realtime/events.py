"""The Realtime protocol's transcription-session events, in the installed `openai` SDK's own types.

Client events are read with the SDK's pydantic models (`openai.types.realtime`), so what the SDK
sends is what is accepted; server events are built from its models and serialised with their
field names, so the SDK parses what earshot sends. `ClientEventError` is a bad client event: the
session answers it with an `error` event and stays open.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pydantic
from openai import BaseModel
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
    InputAudioBufferAppendEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeError,
    RealtimeErrorEvent,
    RealtimeTranscriptionSessionCreateRequest,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)
from openai.types.realtime.conversation_item_input_audio_transcription_completed_event import (
    UsageTranscriptTextUsageDuration,
)
from openai.types.realtime.conversation_item_input_audio_transcription_failed_event import (
    Error as FailedError,
)

# The client events of a transcription session; any other type is answered with an `error`.
CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)
MAX_ID_CHARS = 128  # a client's event_id is echoed back in errors: bounded


class ClientEventError(Exception):
    """A client event that cannot be acted on; becomes an `error` event (the session stays open)."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_value",
        param: str | None = None,
        event_id: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.event_id = event_id
        self.type = type


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class ClientEvent:
    type: str
    event_id: str | None
    data: dict[str, Any]


def parse_client_event(raw: str | bytes) -> ClientEvent:
    """The JSON object of one WebSocket message, checked for a known `type`."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientEventError(
            f"The event is not valid JSON: {str(exc)[:200]}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ClientEventError("The event must be a JSON object with a `type`.", code="invalid_json")
    event_id = data.get("event_id")
    event_id = event_id[:MAX_ID_CHARS] if isinstance(event_id, str) else None
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in CLIENT_EVENTS:
        shown = repr(kind[:64]) if isinstance(kind, str) else "missing"
        raise ClientEventError(
            f"Invalid event type {shown}: a transcription session accepts "
            + ", ".join(f"'{t}'" for t in CLIENT_EVENTS),
            param="type",
            event_id=event_id,
        )
    return ClientEvent(kind, event_id, data)


def _validation_message(exc: pydantic.ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"Invalid value at {loc or 'the event'}: {first['msg']}", loc or None


def parse_session(event: ClientEvent) -> RealtimeTranscriptionSessionCreateRequest:
    """The `session` of a `session.update`, as the SDK's transcription-session model."""
    session = event.data.get("session")
    if not isinstance(session, dict):
        raise ClientEventError(
            "session.update needs a `session` object.", param="session", event_id=event.event_id
        )
    if session.get("type") != "transcription":
        raise ClientEventError(
            "This is a transcription session: `session.type` must be 'transcription' "
            "(earshot does not run conversation sessions).",
            param="session.type",
            event_id=event.event_id,
        )
    try:
        return RealtimeTranscriptionSessionCreateRequest.model_validate(session)
    except pydantic.ValidationError as exc:
        message, loc = _validation_message(exc)
        raise ClientEventError(
            message, param=f"session.{loc}" if loc else "session", event_id=event.event_id
        ) from None


def parse_append(event: ClientEvent) -> InputAudioBufferAppendEvent:
    try:
        return InputAudioBufferAppendEvent.model_validate(event.data)
    except pydantic.ValidationError as exc:
        message, loc = _validation_message(exc)
        raise ClientEventError(message, param=loc, event_id=event.event_id) from None


def dump(event: BaseModel) -> str:
    """The JSON text of a server event (the fields that were set, `null`s included)."""
    return event.model_dump_json(exclude_unset=True)


# ---------------------------------------------------------------------- server events


def error(exc: ClientEventError) -> RealtimeErrorEvent:
    return RealtimeErrorEvent(
        type="error",
        event_id=new_id("event"),
        error=RealtimeError(
            type=exc.type, code=exc.code, message=exc.message, param=exc.param, event_id=exc.event_id
        ),
    )


def session_created(session: RealtimeTranscriptionSessionCreateRequest) -> SessionCreatedEvent:
    return SessionCreatedEvent(type="session.created", event_id=new_id("event"), session=session)


def session_updated(session: RealtimeTranscriptionSessionCreateRequest) -> SessionUpdatedEvent:
    return SessionUpdatedEvent(type="session.updated", event_id=new_id("event"), session=session)


def speech_started(item_id: str, audio_start_ms: int) -> InputAudioBufferSpeechStartedEvent:
    return InputAudioBufferSpeechStartedEvent(
        type="input_audio_buffer.speech_started",
        event_id=new_id("event"),
        item_id=item_id,
        audio_start_ms=audio_start_ms,
    )


def speech_stopped(item_id: str, audio_end_ms: int) -> InputAudioBufferSpeechStoppedEvent:
    return InputAudioBufferSpeechStoppedEvent(
        type="input_audio_buffer.speech_stopped",
        event_id=new_id("event"),
        item_id=item_id,
        audio_end_ms=audio_end_ms,
    )


def committed(item_id: str, previous_item_id: str | None) -> InputAudioBufferCommittedEvent:
    return InputAudioBufferCommittedEvent(
        type="input_audio_buffer.committed",
        event_id=new_id("event"),
        item_id=item_id,
        previous_item_id=previous_item_id,
    )


def cleared() -> InputAudioBufferClearedEvent:
    return InputAudioBufferClearedEvent(type="input_audio_buffer.cleared", event_id=new_id("event"))


def transcription_delta(item_id: str, delta: str) -> ConversationItemInputAudioTranscriptionDeltaEvent:
    return ConversationItemInputAudioTranscriptionDeltaEvent(
        type="conversation.item.input_audio_transcription.delta",
        event_id=new_id("event"),
        item_id=item_id,
        content_index=0,
        delta=delta,
    )


def transcription_completed(
    item_id: str, transcript: str, audio_seconds: float
) -> ConversationItemInputAudioTranscriptionCompletedEvent:
    return ConversationItemInputAudioTranscriptionCompletedEvent(
        type="conversation.item.input_audio_transcription.completed",
        event_id=new_id("event"),
        item_id=item_id,
        content_index=0,
        transcript=transcript,
        usage=UsageTranscriptTextUsageDuration(type="duration", seconds=round(audio_seconds, 3)),
    )


def transcription_failed(
    item_id: str, message: str, *, code: str | None, type: str, param: str | None = None
) -> ConversationItemInputAudioTranscriptionFailedEvent:
    return ConversationItemInputAudioTranscriptionFailedEvent(
        type="conversation.item.input_audio_transcription.failed",
        event_id=new_id("event"),
        item_id=item_id,
        content_index=0,
        error=FailedError(type=type, code=code, message=message, param=param),
    )
