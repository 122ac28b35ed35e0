"""POST /v1/audio/transcriptions, /v1/audio/translations, /v1/audio/speech; GET /v1/audio/voices.

Handlers parse and validate the request (into `TranscribeOptions` / `SpeechOptions`), decode the
upload, call the inference service, and encode its result. A stream holds its model until the last
byte is sent or the client goes away.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, BinaryIO, Literal, cast

import msgspec
from litestar import Controller, MediaType, Response, get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import ServerSentEvent, Stream
from litestar.response.sse import ServerSentEventMessage
from opentelemetry import trace

from earshot.api.errors import ERROR_RESPONSES, bad_request
from earshot.api.formats import segment_json, to_srt, to_vtt, verbose_json
from earshot.api.services import Services
from earshot.audio.encode import CONTENT_TYPES, StreamEncoder, encode_audio
from earshot.inference import SpeechStream, TranscriptStream
from earshot.options import TRANSCRIPTION_SAMPLE_RATE, SpeechOptions, TranscribeOptions
from earshot.types import Task, Transcript

tracer = trace.get_tracer("earshot.api")

TranscriptFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
Granularity = Literal["word", "segment"]


class TranslationForm(msgspec.Struct, kw_only=True):
    """multipart/form-data of POST /v1/audio/translations (into English): OpenAI's fields, plus
    faster-whisper's `hotwords` and `vad_filter`, and Ollama-style `keep_alive`, which clients send
    as extra fields."""

    file: UploadFile
    model: str
    prompt: str | None = None
    response_format: TranscriptFormat = "json"
    temperature: float = 0.0
    stream: bool = False
    hotwords: str | None = None
    vad_filter: bool = False
    keep_alive: float | None = None


class TranscriptionForm(TranslationForm, kw_only=True):
    """multipart/form-data of POST /v1/audio/transcriptions: the translation fields, plus the
    source language and the timestamp granularities."""

    language: str | None = None
    # One form field per value: a single value arrives as a plain string.
    timestamp_granularities: list[Granularity] | Granularity = msgspec.field(
        default_factory=list, name="timestamp_granularities[]"
    )


class SpeechRequest(msgspec.Struct, kw_only=True):
    """JSON body of POST /v1/audio/speech."""

    model: str
    input: str
    voice: str | None = None
    response_format: SpeechFormat = "mp3"
    speed: float = 1.0
    stream: bool = False
    lang: str | None = None  # Kokoro/espeak language of the text (default: the model's, en-us)
    instructions: str | None = None  # accepted for OpenAI compatibility; Kokoro has no use for it
    keep_alive: float | None = None


def _transcript_response(transcript: Transcript, fmt: str, *, task: str, words: bool) -> Response[Any]:
    if fmt == "text":
        return Response(transcript.text + "\n", media_type=MediaType.TEXT)
    if fmt == "srt":
        return Response(to_srt(transcript.segments), media_type="application/x-subrip")
    if fmt == "vtt":
        return Response(to_vtt(transcript.segments), media_type="text/vtt")
    if fmt == "verbose_json":
        return Response(verbose_json(transcript, task=task, words=words), media_type=MediaType.JSON)
    return Response({"text": transcript.text}, media_type=MediaType.JSON)


async def _sse(transcript: TranscriptStream) -> AsyncIterator[ServerSentEventMessage]:
    """OpenAI's streaming transcription events: `transcript.text.delta` per segment (with the
    segment itself), then `transcript.text.done` with the whole text."""
    texts: list[str] = []
    try:
        async for segment in transcript:
            texts.append(segment.text)
            event = {"type": "transcript.text.delta", "delta": segment.text, "segment": segment_json(segment)}
            yield ServerSentEventMessage(data=json.dumps(event))
    finally:
        await transcript.aclose()
    done = {"type": "transcript.text.done", "text": "".join(texts).strip()}
    yield ServerSentEventMessage(data=json.dumps(done))


async def _encoded(services: Services, speech: SpeechStream, fmt: SpeechFormat) -> AsyncIterator[bytes]:
    """Each piece of a speech stream encoded and sent before the next is synthesized."""
    encoder = StreamEncoder(fmt, speech.sample_rate)
    try:
        async for samples in speech:
            chunk = await services.workers.run_work(encoder.write, samples)
            if chunk:
                yield chunk
    finally:
        await speech.aclose()
    tail = await services.workers.run_work(encoder.close)
    if tail:
        yield tail


class AudioController(Controller):
    path = "/v1/audio"
    tags = ["audio"]  # noqa: RUF012 - Litestar's declared attribute

    async def _stt(
        self,
        services: Services,
        form: TranscriptionForm | TranslationForm,
        task: Literal["transcribe", "translate"],
    ) -> Response[Any] | ServerSentEvent:
        spec = await services.spec_for(form.model, Task.TRANSCRIPTION)
        granularities = getattr(form, "timestamp_granularities", [])
        words = "word" in ([granularities] if isinstance(granularities, str) else granularities)
        if words and form.response_format != "verbose_json":
            raise bad_request(
                "timestamp_granularities[] needs response_format=verbose_json",
                param="timestamp_granularities",
            )
        options = TranscribeOptions(
            task=task,
            language=getattr(form, "language", None),
            prompt=form.prompt,
            temperature=form.temperature,
            word_timestamps=words,
            vad_filter=form.vad_filter,
            hotwords=form.hotwords,
            keep_alive=form.keep_alive,
        )
        with tracer.start_as_current_span("decode_audio"):
            audio = await services.decoder.decode(
                cast(BinaryIO, form.file.file),
                sample_rate=TRANSCRIPTION_SAMPLE_RATE,
                max_seconds=services.settings.max_audio_seconds,
            )
        if form.stream:
            return ServerSentEvent(_sse(await services.inference.transcribe_stream(spec.id, audio, options)))
        transcript = await services.inference.transcribe(spec.id, audio, options)
        return _transcript_response(transcript, form.response_format, task=task, words=words)

    @post(
        "/transcriptions",
        status_code=200,
        responses=ERROR_RESPONSES,
        summary="Transcribe audio (OpenAI-compatible)",
    )
    async def transcriptions(
        self,
        services: Services,
        data: Annotated[TranscriptionForm, Body(media_type=RequestEncodingType.MULTI_PART)],
    ) -> Response[Any] | ServerSentEvent:
        return await self._stt(services, data, "transcribe")

    @post(
        "/translations",
        status_code=200,
        responses=ERROR_RESPONSES,
        summary="Translate audio into English text (OpenAI-compatible)",
    )
    async def translations(
        self,
        services: Services,
        data: Annotated[TranslationForm, Body(media_type=RequestEncodingType.MULTI_PART)],
    ) -> Response[Any] | ServerSentEvent:
        return await self._stt(services, data, "translate")

    @post(
        "/speech", status_code=200, responses=ERROR_RESPONSES, summary="Synthesize speech (OpenAI-compatible)"
    )
    async def speech(self, services: Services, data: SpeechRequest) -> Response[bytes] | Stream:
        spec = await services.spec_for(data.model, Task.SPEECH)
        text = data.input.strip()
        if not text:
            raise bad_request("input must not be empty", param="input")
        limit = services.settings.max_input_chars
        if len(data.input) > limit:
            raise bad_request(
                f"input is {len(data.input)} characters; at most {limit} are accepted (max_input_chars)",
                param="input",
                code="string_above_max_length",
            )
        options = SpeechOptions(
            voice=data.voice, speed=data.speed, lang=data.lang, keep_alive=data.keep_alive
        )
        content_type = CONTENT_TYPES[data.response_format]
        if data.stream:
            speech = await services.inference.synthesize_stream(spec.id, text, options)
            return Stream(_encoded(services, speech, data.response_format), media_type=content_type)
        result = await services.inference.synthesize(spec.id, text, options)
        body = await services.workers.run_work(
            encode_audio, result.samples, result.sample_rate, data.response_format
        )
        return Response(body, media_type=content_type)

    @get("/voices", responses=ERROR_RESPONSES, summary="Voices of the speech models")
    async def voices(
        self,
        services: Services,
        model: Annotated[str | None, Parameter(query="model", required=False, max_length=256)] = None,
    ) -> dict[str, Any]:
        """Voices of one speech model (`?model=`) or of every speech model whose files are on this
        machine, read from the models' voices files: listing voices never loads a model."""
        specs = (
            [await services.spec_for(model, Task.SPEECH)]
            if model
            else [services.catalog.specs[i] for i in services.catalog.ids(Task.SPEECH)]
        )
        data: list[dict[str, Any]] = []
        for spec in specs:
            data.extend({"model": spec.id, "voice": v} for v in await services.inference.voices(spec.id))
        return {"object": "list", "data": data}
