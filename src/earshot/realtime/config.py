"""A session's effective configuration, applied from `session.update` and shown in
`session.created` / `session.updated` (the SDK's transcription-session model).

Only the fields present in an update change (the protocol's rule); `turn_detection: null` turns
server VAD off (manual commits). What earshot cannot do is refused with an `error` (semantic VAD)
or shown as off in the effective configuration (noise reduction, logprobs), never silently
pretended.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from openai.types.realtime import RealtimeTranscriptionSessionCreateRequest
from openai.types.realtime.audio_transcription import AudioTranscription
from openai.types.realtime.realtime_audio_formats import AudioPCM, AudioPCMA, AudioPCMU
from openai.types.realtime.realtime_transcription_session_audio import RealtimeTranscriptionSessionAudio
from openai.types.realtime.realtime_transcription_session_audio_input import (
    RealtimeTranscriptionSessionAudioInput,
)
from openai.types.realtime.realtime_transcription_session_audio_input_turn_detection import ServerVad

from earshot.realtime.audio import BETA_NAMES, FORMATS, PCM16, InputFormat
from earshot.realtime.events import ClientEventError
from earshot.realtime.vad import VadSettings

MAX_PREFIX_PADDING_MS = 10_000
MAX_SILENCE_MS = 10_000
MAX_PROMPT_CHARS = 2_000
MAX_LANGUAGE_CHARS = 16

DEFAULT_VAD = VadSettings()


class CatalogModel(Protocol):
    """What a session needs of a catalog entry (`earshot.types.ModelSpec`)."""

    @property
    def id(self) -> str: ...

    @property
    def task(self) -> str: ...


Resolve = Callable[[str], CatalogModel | None]


@dataclass(frozen=True, slots=True)
class SessionConfig:
    model: str  # catalog id
    format: InputFormat = PCM16
    language: str | None = None
    prompt: str | None = None
    vad: VadSettings | None = DEFAULT_VAD  # None: turn_detection null, manual commits

    def describe(self) -> RealtimeTranscriptionSessionCreateRequest:
        """The effective configuration, as the SDK's model of it."""
        fmt: AudioPCM | AudioPCMU | AudioPCMA
        if self.format.type == "audio/pcm":
            fmt = AudioPCM(type="audio/pcm", rate=24000)
        elif self.format.type == "audio/pcmu":
            fmt = AudioPCMU(type="audio/pcmu")
        else:
            fmt = AudioPCMA(type="audio/pcma")
        vad = self.vad
        return RealtimeTranscriptionSessionCreateRequest(
            type="transcription",
            audio=RealtimeTranscriptionSessionAudio(
                input=RealtimeTranscriptionSessionAudioInput(
                    format=fmt,
                    transcription=AudioTranscription(
                        model=self.model, language=self.language, prompt=self.prompt
                    ),
                    turn_detection=None
                    if vad is None
                    else ServerVad(
                        type="server_vad",
                        threshold=vad.threshold,
                        prefix_padding_ms=vad.prefix_padding_ms,
                        silence_duration_ms=vad.silence_duration_ms,
                    ),
                    noise_reduction=None,
                )
            ),
            include=[],
        )


def _format(value: object) -> InputFormat:
    if isinstance(value, str) and value in BETA_NAMES:
        return BETA_NAMES[value]
    kind = getattr(value, "type", None)
    if kind is None:
        return PCM16
    fmt = FORMATS.get(str(kind))
    if fmt is None:
        raise ClientEventError(
            f"Unsupported audio format {str(kind)[:40]!r}: expected 'audio/pcm' (24 kHz), 'audio/pcmu' or 'audio/pcma'",
            param="session.audio.input.format",
        )
    rate = getattr(value, "rate", None)
    if rate is not None and rate != fmt.rate:
        raise ClientEventError(
            f"Unsupported sample rate {rate}: {fmt.type} is {fmt.rate} Hz",
            param="session.audio.input.format.rate",
        )
    return fmt


def _vad(value: object, current: VadSettings | None) -> VadSettings:
    kind = getattr(value, "type", None)
    if kind != "server_vad":
        raise ClientEventError(
            f"Unsupported turn_detection type {str(kind)[:40]!r}: earshot has 'server_vad' (Silero VAD) or null (manual commit)",
            param="session.audio.input.turn_detection.type",
        )
    base = current or VadSettings()
    threshold = getattr(value, "threshold", None)
    prefix = getattr(value, "prefix_padding_ms", None)
    silence = getattr(value, "silence_duration_ms", None)
    param = "session.audio.input.turn_detection."
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ClientEventError("threshold must be between 0.0 and 1.0", param=param + "threshold")
    if prefix is not None and not 0 <= prefix <= MAX_PREFIX_PADDING_MS:
        raise ClientEventError(
            f"prefix_padding_ms must be between 0 and {MAX_PREFIX_PADDING_MS}",
            param=param + "prefix_padding_ms",
        )
    if silence is not None and not 0 <= silence <= MAX_SILENCE_MS:
        raise ClientEventError(
            f"silence_duration_ms must be between 0 and {MAX_SILENCE_MS}", param=param + "silence_duration_ms"
        )
    return VadSettings(
        threshold=base.threshold if threshold is None else float(threshold),
        prefix_padding_ms=base.prefix_padding_ms if prefix is None else int(prefix),
        silence_duration_ms=base.silence_duration_ms if silence is None else int(silence),
    )


def resolve_model(name: str, resolve: Resolve, param: str) -> CatalogModel:
    """The catalog model a client names (id or alias), checked to be a transcription model."""
    spec = resolve(name)
    if spec is None:
        raise ClientEventError(
            f"The model {name[:100]!r} does not exist (see GET /v1/models for the transcription models)",
            code="model_not_found",
            param=param,
        )
    if spec.task != "transcription":
        raise ClientEventError(
            f"The model {spec.id!r} is a {spec.task} model, not a transcription model",
            code="wrong_model_task",
            param=param,
        )
    return spec


def apply_update(
    config: SessionConfig, session: RealtimeTranscriptionSessionCreateRequest, resolve: Resolve
) -> SessionConfig:
    """`config` with the fields `session` sets; ClientEventError (nothing applied) when one is bad."""
    audio = session.audio
    inp = audio.input if audio is not None else None
    if inp is None:
        return config
    changes: dict[str, object] = {}
    fields = inp.model_fields_set
    if "format" in fields and inp.format is not None:
        changes["format"] = _format(inp.format)
    if "turn_detection" in fields:
        changes["vad"] = None if inp.turn_detection is None else _vad(inp.turn_detection, config.vad)
    transcription = inp.transcription
    if "transcription" in fields and transcription is not None:
        tf = transcription.model_fields_set
        param = "session.audio.input.transcription."
        if "model" in tf and transcription.model:
            changes["model"] = resolve_model(str(transcription.model), resolve, param + "model").id
        if "language" in tf:
            language = (transcription.language or "").strip().lower() or None
            if language is not None and (len(language) > MAX_LANGUAGE_CHARS or not language.isascii()):
                raise ClientEventError(
                    "language must be an ISO-639-1 code such as 'en'", param=param + "language"
                )
            changes["language"] = language
        if "prompt" in tf:
            prompt = transcription.prompt or None
            if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
                raise ClientEventError(
                    f"prompt is longer than {MAX_PROMPT_CHARS} characters", param=param + "prompt"
                )
            changes["prompt"] = prompt
    return replace(config, **changes)  # type: ignore[arg-type]
