"""One realtime transcription session: client events in, server events out, turns transcribed.

Transport-free: the WebSocket handler (`earshot.realtime.route`) feeds `handle()` with each
message and gives a `send` coroutine for the JSON text of each server event.

- The model: the session holds its transcription model (`inference.hold`) from the first event that
  needs it (a `session.update` naming a model, the first audio or commit) until it ends, so the
  cache never evicts it under an open session. A `session.update` to another model takes the new
  hold before it lets go of the old one.
- Audio: `input_audio_buffer.append` is decoded to 16 kHz (`audio.AudioDecoder`) into the buffer.
  With `server_vad`, Silero VAD runs on every complete 32 ms frame; at speech start the session
  sends `speech_started`, at speech stop `speech_stopped` then `committed`, and the turn (from
  `prefix_padding_ms` before the speech to the end of the silence that ended it) is queued for
  transcription. While nobody speaks the buffer keeps only the prefix padding. With
  `turn_detection: null` the buffer grows until `commit` (or `clear`), at most
  `realtime_max_buffer_seconds`; with VAD, a turn that long is cut there and committed.
- Turns are transcribed one at a time, in order, by a worker task (at most `MAX_PENDING_TURNS`
  wait), while audio keeps coming in. Each ends with one `delta` carrying the turn's whole text,
  then `completed` (or `failed`). There are no partial deltas while a turn is still open.
- Latency, as `earshot_realtime_transcript_latency_seconds` measures it: from the moment the
  server decides the turn is over (VAD stop or commit) to the `completed` event sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from openai import BaseModel

from earshot.inference.errors import CacheClosed, CacheError, RequestError, UnknownModel
from earshot.inference.protocol import PCM, Inference
from earshot.options import TRANSCRIPTION_SAMPLE_RATE, TranscribeOptions
from earshot.realtime import events as ev
from earshot.realtime.audio import AudioDecoder
from earshot.realtime.buffer import AudioBuffer
from earshot.realtime.config import Resolve, SessionConfig, apply_update
from earshot.realtime.events import ClientEvent, ClientEventError
from earshot.realtime.registry import RealtimeSessions
from earshot.realtime.vad import FRAME, SileroVad, SpeechStart, TurnDetector, VadStream
from earshot.session_events import (
    AudioReceived,
    SessionModelChanged,
    TurnCompleted,
    TurnFailed,
)

log = logging.getLogger("earshot.realtime")

MAX_PENDING_TURNS = 8
RATE = TRANSCRIPTION_SAMPLE_RATE

Send = Callable[[str], Awaitable[None]]


class SessionFailed(Exception):
    """The session cannot go on (its model cannot be held); the handler closes it."""

    def __init__(self, message: str, *, code: str, close_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.close_code = close_code


@dataclass(frozen=True, slots=True)
class Turn:
    item_id: str
    audio: PCM
    model: str
    options: TranscribeOptions
    ended_at: float  # perf_counter at VAD stop or commit


def _ms(samples: int) -> int:
    return samples * 1000 // RATE


class Session:
    def __init__(
        self,
        *,
        session_id: str,
        config: SessionConfig,
        inference: Inference,
        resolve: Resolve,
        registry: RealtimeSessions,
        vad: SileroVad,
        send: Send,
        max_buffer_seconds: float,
    ) -> None:
        self.id = session_id
        self.config = config
        self._inference = inference
        self._resolve = resolve
        self._registry = registry
        self._vad_model = vad
        self._send = send
        self._max_samples = max(FRAME, int(max_buffer_seconds * RATE))
        self._max_buffer_seconds = max_buffer_seconds
        self.started_at = time.time()
        self.turns = 0
        self.audio_s = 0.0
        self._decoder = AudioDecoder(config.format)
        self._buffer = AudioBuffer()
        self._vad: VadStream = vad.stream()
        self._detector: TurnDetector | None = TurnDetector(config.vad) if config.vad else None
        self._turn_start: int | None = None  # buffer position of the open turn (VAD speaking)
        self._item_id: str | None = None  # the open turn's item
        self._previous_item: str | None = None
        self._held: str | None = None
        self._hold: AsyncExitStack | None = None
        self._turns: asyncio.Queue[Turn | None] = asyncio.Queue(MAX_PENDING_TURNS)
        self._worker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name=f"realtime-turns-{self.id}")
        await self._emit(ev.session_created(self.config.describe()))

    async def aclose(self) -> None:
        """End the session: turns still waiting are dropped, the one in the model finishes (it is
        not cancelled into the inference layer; its events go nowhere once the client is gone),
        then the model is let go of, whatever happened before."""
        worker, self._worker = self._worker, None
        try:
            if worker is not None:
                while not self._turns.empty():
                    self._turns.get_nowait()
                self._turns.put_nowait(None)  # the worker's last item
                try:
                    await asyncio.shield(worker)
                except asyncio.CancelledError:  # the handler itself is cancelled (shutdown)
                    worker.cancel()
                    with contextlib.suppress(BaseException):
                        await worker
                    raise
                except Exception:
                    log.exception("realtime session %s: the turn worker failed", self.id)
        finally:
            hold, self._hold = self._hold, None
            self._held = None
            if hold is not None:
                await hold.aclose()

    # ------------------------------------------------------------------ client events

    async def handle(self, raw: str | bytes) -> None:
        """One client message. A bad event is answered with an `error` event; SessionFailed ends it."""
        event_id: str | None = None
        try:
            event = ev.parse_client_event(raw)
            event_id = event.event_id
            if event.type == "input_audio_buffer.append":
                await self._append(event)
            elif event.type == "session.update":
                await self._update(event)
            elif event.type == "input_audio_buffer.commit":
                await self._commit()
            else:  # input_audio_buffer.clear
                self._clear()
                await self._emit(ev.cleared())
        except ClientEventError as exc:
            if exc.event_id is None:
                exc.event_id = event_id
            await self._emit(ev.error(exc))

    async def _update(self, event: ClientEvent) -> None:
        session = ev.parse_session(event)
        config = apply_update(self.config, session, self._resolve)
        if config.model != self.config.model:
            previous = self.config.model
            await self._hold_model(config.model)
            self._registry.set_model(self.id, config.model)
            self._registry.publish(
                SessionModelChanged(session_id=self.id, model=config.model, at=time.time(), previous=previous)
            )
        else:
            await self._hold_model(config.model)
        if config.format != self.config.format:
            self._decoder = AudioDecoder(config.format)
        if config.vad != self.config.vad:
            position = self._detector.position if self._detector else self._buffer.end
            self._detector = TurnDetector(config.vad, start=position) if config.vad else None
            if self._detector is not None:
                self._detector.floor = self._buffer.start
            if self._turn_start is not None:  # the open turn stays in the buffer for the next commit
                self._turn_start = None
                self._item_id = None
        self.config = config
        await self._emit(ev.session_updated(config.describe()))

    async def _append(self, event: ClientEvent) -> None:
        append = ev.parse_append(event)
        try:
            data = base64.b64decode(append.audio, validate=True)
        except (binascii.Error, ValueError):
            raise ClientEventError("`audio` is not valid base64", param="audio") from None
        if not data:
            return
        fmt = self.config.format
        seconds = fmt.seconds(len(data))
        if seconds > self._max_buffer_seconds:
            raise ClientEventError(
                f"One append carries {seconds:.1f} s of audio; the buffer holds at most "
                f"{self._max_buffer_seconds:g} s (realtime_max_buffer_seconds): send smaller chunks",
                code="input_audio_buffer_full",
                param="audio",
            )
        if self._detector is None and len(self._buffer) + seconds * RATE > self._max_samples:
            raise ClientEventError(
                f"The input audio buffer is full ({self._max_buffer_seconds:g} s, realtime_max_buffer_seconds): "
                "commit or clear it; this chunk was dropped",
                code="input_audio_buffer_full",
                param="audio",
            )
        await self._hold_model(self.config.model)
        samples = self._decoder.decode(data)
        self.audio_s += seconds
        self._registry.publish(
            AudioReceived(session_id=self.id, model=self.config.model, at=time.time(), seconds=seconds)
        )
        self._buffer.append(samples)
        detector = self._detector
        if detector is None:
            return
        for change in detector.feed(self._vad.feed(samples)):
            if isinstance(change, SpeechStart):
                self._turn_start = change.at
                self._item_id = ev.new_id("item")
                await self._emit(ev.speech_started(self._item_id, _ms(change.at)))
            else:
                await self._end_turn(change.at)
        if self._turn_start is not None and detector.position - self._turn_start >= self._max_samples:
            await self._end_turn(detector.position)  # too long a turn: cut it here
            detector.reset(detector.position)
        if self._turn_start is None:  # nobody speaking: keep just what a prefix may need
            self._buffer.drop_before(detector.position - detector.prefix - FRAME)

    async def _end_turn(self, stop: int) -> None:
        """VAD stop: speech_stopped, committed, and the turn queued."""
        item_id = self._item_id or ev.new_id("item")
        start = self._turn_start if self._turn_start is not None else self._buffer.start
        self._turn_start = None
        self._item_id = None
        await self._emit(ev.speech_stopped(item_id, _ms(stop)))
        await self._queue_turn(item_id, start, stop)

    async def _commit(self) -> None:
        start = self._turn_start if self._turn_start is not None else self._buffer.start
        stop = self._buffer.end
        if stop - start < RATE // 10:
            raise ClientEventError(
                f"Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, "
                f"but buffer only has {_ms(max(0, stop - start))}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        await self._hold_model(self.config.model)
        item_id = self._item_id or ev.new_id("item")
        self._turn_start = None
        self._item_id = None
        if self._detector is not None:
            self._detector.reset(stop)
        await self._queue_turn(item_id, start, stop)

    def _clear(self) -> None:
        self._buffer.clear()
        self._turn_start = None
        self._item_id = None
        if self._detector is not None:
            self._detector.reset(self._buffer.end)

    async def _queue_turn(self, item_id: str, start: int, stop: int) -> None:
        ended_at = time.perf_counter()
        audio = self._buffer.take(start, stop)
        self._buffer.drop_before(stop)
        config = self.config
        await self._emit(ev.committed(item_id, self._previous_item))
        self._previous_item = item_id
        turn = Turn(
            item_id=item_id,
            audio=audio,
            model=config.model,
            options=TranscribeOptions(language=config.language, prompt=config.prompt),
            ended_at=ended_at,
        )
        try:
            self._turns.put_nowait(turn)
        except asyncio.QueueFull:
            await self._fail(
                turn,
                f"{MAX_PENDING_TURNS} turns are waiting for transcription already; this one was dropped",
                code="too_many_turns",
                type="server_error",
            )

    # ------------------------------------------------------------------ the model

    async def _hold_model(self, model: str) -> None:
        """Hold `model` for the session (a no-op when it is the one held)."""
        if self._held == model:
            return
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(self._inference.hold(model))
        except UnknownModel as exc:
            await stack.aclose()
            raise ClientEventError(str(exc), code="model_not_found", param="model") from None
        except RequestError as exc:
            await stack.aclose()
            raise ClientEventError(exc.message, param=exc.param, code=exc.code or "invalid_value") from None
        except CacheClosed as exc:
            await stack.aclose()
            raise SessionFailed(str(exc), code="server_shutting_down", close_code=1012) from None
        except CacheError as exc:  # load failed or timed out, cache full or busy
            await stack.aclose()
            raise SessionFailed(
                f"The model {model!r} cannot be held: {exc}", code="model_unavailable", close_code=1013
            ) from None
        old, self._hold, self._held = self._hold, stack, model
        if old is not None:
            await old.aclose()

    # ------------------------------------------------------------------ turns

    async def _work(self) -> None:
        while True:
            turn = await self._turns.get()
            if turn is None:  # the session is ending
                return
            await self._transcribe(turn)

    async def _transcribe(self, turn: Turn) -> None:
        started = time.perf_counter()
        try:
            transcript = await self._inference.transcribe(turn.model, turn.audio, turn.options)
        except (
            RequestError,
            ValueError,
        ) as exc:  # RequestError; the backends' request errors are ValueErrors
            message = getattr(exc, "message", None) or str(exc)
            code, param = getattr(exc, "code", None), getattr(exc, "param", None)
            await self._fail(turn, message, code=code, type="invalid_request_error", param=param)
            return
        except CacheError as exc:
            await self._fail(turn, str(exc), code="model_unavailable", type="server_error")
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("realtime turn %s failed", turn.item_id)
            await self._fail(
                turn, f"transcription failed: {type(exc).__name__}", code=None, type="server_error"
            )
            return
        inference_s = time.perf_counter() - started
        audio_s = len(turn.audio) / RATE
        text = transcript.text
        if text:
            await self._emit(ev.transcription_delta(turn.item_id, text))
        await self._emit(ev.transcription_completed(turn.item_id, text, audio_s))
        self.turns += 1
        self._registry.publish(
            TurnCompleted(
                session_id=self.id,
                model=turn.model,
                at=time.time(),
                item_id=turn.item_id,
                audio_s=audio_s,
                inference_s=inference_s,
                latency_s=time.perf_counter() - turn.ended_at,
            )
        )

    async def _fail(
        self, turn: Turn, message: str, *, code: str | None, type: str, param: str | None = None
    ) -> None:
        await self._emit(ev.transcription_failed(turn.item_id, message, code=code, type=type, param=param))
        self._registry.publish(
            TurnFailed(
                session_id=self.id, model=turn.model, at=time.time(), item_id=turn.item_id, error=message
            )
        )

    async def _emit(self, event: BaseModel) -> None:
        await self._send(ev.dump(event))
