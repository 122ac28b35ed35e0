"""POST /v1/audio/transcriptions, /v1/audio/translations, /v1/audio/speech; GET /v1/audio/voices.

Every inference goes through the model cache: the request holds a reference to its model for as
long as it uses it (for a stream, until the last byte is sent or the client goes away).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
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
from earshot.backends import UnsupportedTask
from earshot.backends.whisper import Transcript, WhisperHandle
from earshot.cache.protocol import Task

tracer = trace.get_tracer("earshot.api")

WHISPER_RATE = 16_000
TranscriptFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
Granularity = Literal["word", "segment"]
MAX_KEEP_ALIVE = 10 * 365 * 86400.0  # seconds; -1 is the way to say "never unload"
DEFAULT_VOICE = "alloy"  # OpenAI requires a voice; without one, the model's voice for "alloy"


class TranscriptionForm(msgspec.Struct, kw_only=True):
    """multipart/form-data of POST /v1/audio/transcriptions (OpenAI's fields, plus faster-whisper's
    `hotwords` and `vad_filter`, and Ollama-style `keep_alive`, which clients send as extra fields)."""

    file: UploadFile
    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: TranscriptFormat = "json"
    temperature: float = 0.0
    # One form field per value: a single value arrives as a plain string.
    timestamp_granularities: list[Granularity] | Granularity = msgspec.field(
        default_factory=list, name="timestamp_granularities[]"
    )
    stream: bool = False
    hotwords: str | None = None
    vad_filter: bool = False
    keep_alive: float | None = None


class TranslationForm(msgspec.Struct, kw_only=True):
    """multipart/form-data of POST /v1/audio/translations (into English)."""

    file: UploadFile
    model: str
    prompt: str | None = None
    response_format: TranscriptFormat = "json"
    temperature: float = 0.0
    stream: bool = False
    hotwords: str | None = None
    vad_filter: bool = False
    keep_alive: float | None = None


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


def check_keep_alive(value: float | None) -> None:
    """-1 (never unload), 0 (unload now) or finite seconds up to MAX_KEEP_ALIVE. NaN compares false
    with everything (it would pass `< 0` and mean "never" by accident); inf and huge values have no
    representable expiry time (`/api/ps` expires_at)."""
    if value is None or value == -1:
        return
    if not math.isfinite(value) or not 0 <= value <= MAX_KEEP_ALIVE:
        raise bad_request(
            f"keep_alive must be -1 (never unload), 0 (unload now) or seconds from 0 to {MAX_KEEP_ALIVE:.0f}",
            param="keep_alive",
        )


def _check_temperature(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise bad_request("temperature must be between 0 and 1", param="temperature")


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


# First item of a stream generator that sends nothing: "checks passed, model held". Whatever the
# generator makes current after it (the inference span) is then attached and detached in the task
# that streams the response; made current before it, it would be attached here, in the handler's
# context, and detached in Litestar's streaming task ("Failed to detach context", logged as ERROR).
READY: Any = object()


async def _prefetch(agen: AsyncGenerator[Any, None]) -> AsyncIterator[Any]:
    """Run a generator to its first item now, so errors before it (unknown voice, load failure,
    cache full) become proper HTTP errors instead of a broken 200 stream. A first item `READY` is
    not sent."""
    first = await agen.__anext__()

    async def rest() -> AsyncIterator[Any]:
        try:
            if first is not READY:
                yield first
            async for item in agen:
                yield item
        finally:
            await agen.aclose()

    return rest()


class AudioController(Controller):
    path = "/v1/audio"
    tags = ["audio"]  # noqa: RUF012 - Litestar's declared attribute

    async def _stt(
        self,
        services: Services,
        form: TranscriptionForm | TranslationForm,
        task: Literal["transcribe", "translate"],
    ) -> Response[Any] | ServerSentEvent:
        spec = services.spec_for(form.model, Task.TRANSCRIPTION)
        _check_temperature(form.temperature)
        check_keep_alive(form.keep_alive)
        language = getattr(form, "language", None) or None
        granularities = getattr(form, "timestamp_granularities", [])
        words = "word" in ([granularities] if isinstance(granularities, str) else granularities)
        if words and form.response_format != "verbose_json":
            raise bad_request(
                "timestamp_granularities[] needs response_format=verbose_json",
                param="timestamp_granularities",
            )
        settings = services.settings
        with tracer.start_as_current_span("decode_audio"):
            audio = await services.decoder.decode(
                cast(BinaryIO, form.file.file),
                sample_rate=WHISPER_RATE,
                max_seconds=settings.max_audio_seconds,
            )
        audio_s = len(audio) / WHISPER_RATE
        options: dict[str, Any] = {
            "task": task,
            "language": language,
            "prompt": form.prompt or None,
            "temperature": form.temperature,
            "word_timestamps": words,
            "vad_filter": form.vad_filter,
            "hotwords": form.hotwords or None,
        }

        def check(handle: WhisperHandle) -> None:
            if task == "translate" and not handle.multilingual:
                raise UnsupportedTask(
                    f"The model {spec.id!r} is English-only and cannot translate; use a multilingual model "
                    "such as faster-whisper-base."
                )
            if language is not None and language not in handle.supported_languages:
                raise bad_request(
                    f"Unsupported language {language[:20]!r} for model {spec.id!r}", param="language"
                )

        if form.stream:
            return ServerSentEvent(
                await _prefetch(self._stt_events(services, spec.id, audio, options, check, form))
            )

        async with services.acquire(spec.id, form.keep_alive) as lease:
            handle: WhisperHandle = lease.handle
            check(handle)
            with tracer.start_as_current_span(
                "inference",
                attributes={
                    "earshot.model": spec.id,
                    "earshot.task": spec.task.value,
                    "earshot.audio_seconds": audio_s,
                },
            ):
                started = time.perf_counter()
                # Segment by segment, so a cancelled request (client gone) stops at the next one.
                steps = services.gate.iterate(spec.id, lambda: handle.transcribe_steps(audio, **options))
                async with aclosing(steps):
                    transcript = [step async for step in steps if step is not None][-1]
                services.record_inference(
                    model=spec.id,
                    task=spec.task.value,
                    duration_s=time.perf_counter() - started,
                    audio_s=audio_s,
                )
        return _transcript_response(transcript, form.response_format, task=task, words=words)

    async def _stt_events(
        self,
        services: Services,
        model: str,
        audio: Any,
        options: dict[str, Any],
        check: Any,
        form: TranscriptionForm | TranslationForm,
    ) -> AsyncGenerator[ServerSentEventMessage, None]:
        """OpenAI's streaming transcription events: `transcript.text.delta` per segment (with the
        segment itself), then `transcript.text.done` with the whole text."""
        audio_s = len(audio) / WHISPER_RATE
        async with services.acquire(model, form.keep_alive) as lease:
            handle: WhisperHandle = lease.handle
            check(handle)
            yield READY  # errors above are HTTP errors; the span below starts in the streaming task
            started = time.perf_counter()
            texts: list[str] = []
            with tracer.start_as_current_span(
                "inference",
                attributes={
                    "earshot.model": model,
                    "earshot.task": Task.TRANSCRIPTION.value,
                    "earshot.audio_seconds": audio_s,
                },
            ):
                segments = services.gate.iterate(model, lambda: handle.iter_segments(audio, **options))
                async with aclosing(segments):
                    async for segment in segments:
                        texts.append(segment.text)
                        event = {
                            "type": "transcript.text.delta",
                            "delta": segment.text,
                            "segment": segment_json(segment),
                        }
                        yield ServerSentEventMessage(data=json.dumps(event))
            services.record_inference(
                model=model,
                task=Task.TRANSCRIPTION.value,
                duration_s=time.perf_counter() - started,
                audio_s=audio_s,
            )
        done = {"type": "transcript.text.done", "text": "".join(texts).strip()}
        yield ServerSentEventMessage(data=json.dumps(done))

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
        spec = services.spec_for(data.model, Task.SPEECH)
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
        if not 0.25 <= data.speed <= 4.0:
            raise bad_request("speed must be between 0.25 and 4.0", param="speed")
        check_keep_alive(data.keep_alive)
        content_type = CONTENT_TYPES[data.response_format]
        if data.stream:
            return Stream(
                await _prefetch(self._speech_chunks(services, spec.id, text, data)), media_type=content_type
            )

        async with services.acquire(spec.id, data.keep_alive) as lease:
            handle = lease.handle
            voice = handle.resolve_voice(data.voice or DEFAULT_VOICE)
            with tracer.start_as_current_span(
                "inference", attributes={"earshot.model": spec.id, "earshot.task": spec.task.value}
            ) as span:
                started = time.perf_counter()
                # One Kokoro.create for the whole text: kokoro-onnx splits it at sentence boundaries into
                # batches its model accepts, faster than one call per sentence (bench/ tts).
                samples = await services.gate.run(
                    spec.id, handle.synthesize, text, voice, speed=data.speed, lang=data.lang
                )
                audio_s = len(samples) / handle.sample_rate
                span.set_attribute("earshot.audio_seconds", audio_s)
                services.record_inference(
                    model=spec.id,
                    task=spec.task.value,
                    duration_s=time.perf_counter() - started,
                    audio_s=audio_s,
                )
            rate = handle.sample_rate
        body = await asyncio.to_thread(encode_audio, samples, rate, data.response_format)
        return Response(body, media_type=content_type)

    async def _speech_chunks(
        self, services: Services, model: str, text: str, data: SpeechRequest
    ) -> AsyncGenerator[bytes, None]:
        """Audio as it is made: sentence by sentence, each encoded and sent before the next is synthesized.

        The first piece is synthesized before the response starts (`_prefetch` runs this generator to
        its first item), so what fails on it (an unsupported `lang`, ...) is an HTTP error like without
        `stream`, not a 200 cut short after its headers."""
        async with services.acquire(model, data.keep_alive) as lease:
            handle = lease.handle
            voice = handle.resolve_voice(data.voice or DEFAULT_VOICE)
            encoder = StreamEncoder(data.response_format, handle.sample_rate)
            started = time.perf_counter()
            audio_s = 0.0
            # Not made current here: this generator runs up to its first item in the handler's
            # context and on in the task that streams the response, and a context attached in one
            # cannot be detached in the other. The worker thread makes it current while it works.
            span = tracer.start_span(
                "inference", attributes={"earshot.model": model, "earshot.task": Task.SPEECH.value}
            )

            def synthesize() -> Iterator[Any]:
                with trace.use_span(span, end_on_exit=False):
                    yield from handle.iter_synthesize(text, voice, speed=data.speed, lang=data.lang)

            try:
                pieces = services.gate.iterate(model, synthesize)
                first = True
                async with aclosing(pieces):
                    async for samples in pieces:
                        audio_s += len(samples) / handle.sample_rate
                        chunk = await asyncio.to_thread(encoder.write, samples)
                        if chunk or first:  # the first piece ends the prefetch, even if still encoded in part
                            yield chunk
                        first = False
                span.set_attribute("earshot.audio_seconds", audio_s)
            finally:
                span.end()
            services.record_inference(
                model=model, task=Task.SPEECH.value, duration_s=time.perf_counter() - started, audio_s=audio_s
            )
        tail = await asyncio.to_thread(encoder.close)
        if tail:
            yield tail

    @get("/voices", responses=ERROR_RESPONSES, summary="Voices of the speech models")
    async def voices(
        self,
        services: Services,
        model: Annotated[str | None, Parameter(query="model", required=False, max_length=256)] = None,
    ) -> dict[str, Any]:
        """Voices of one speech model (`?model=`) or of every loaded speech model; loads the model asked for."""
        specs = (
            [services.spec_for(model, Task.SPEECH)]
            if model
            else [services.catalog.resolve(i) for i in services.catalog.ids(Task.SPEECH)]
        )
        data: list[dict[str, Any]] = []
        for spec in specs:
            if spec is None or (spec.source == "hf" and not model):
                continue
            async with services.acquire(spec.id, None) as lease:
                data.extend({"model": spec.id, "voice": v} for v in lease.handle.voices)
        return {"object": "list", "data": data}
