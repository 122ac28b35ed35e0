"""TEMPORARY: the two `Inference` methods a realtime session uses (`hold`, `transcribe`), over the
cache as `earshot.api.audio` reaches it today (`Services.acquire` + the WhisperHandle + the
inference gate). The lead replaces it with `earshot.inference.local.LocalInference` on merge;
nothing else of the realtime package knows it exists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from earshot.inference.protocol import PCM
from earshot.options import TRANSCRIPTION_SAMPLE_RATE, TranscribeOptions
from earshot.types import Transcript


class CacheInference:
    """`hold` and `transcribe` of the Inference protocol, on `acquire(model_id, keep_alive)`."""

    def __init__(
        self,
        acquire: Callable[[str, float | None], AbstractAsyncContextManager[Any]],
        run: Callable[..., Any],
        record_inference: Callable[..., None],
    ) -> None:
        self._acquire = acquire
        self._run = run  # InferenceGate.run(model, fn, *args, **kwargs)
        self._record = record_inference

    @asynccontextmanager
    async def _hold(self, model_id: str, keep_alive: float | None) -> AsyncIterator[None]:
        async with self._acquire(model_id, keep_alive):
            yield

    def hold(self, model_id: str, keep_alive: float | None = None) -> AbstractAsyncContextManager[None]:
        return self._hold(model_id, keep_alive)

    async def transcribe(self, model_id: str, audio: PCM, options: TranscribeOptions) -> Transcript:
        async with self._acquire(model_id, options.keep_alive) as lease:
            handle = lease.handle
            started = time.perf_counter()
            work = asyncio.ensure_future(
                self._run(
                    model_id,
                    handle.transcribe,
                    audio,
                    task=options.task,
                    language=options.language,
                    prompt=options.prompt,
                    temperature=options.temperature,
                )
            )
            try:
                transcript: Transcript = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The worker thread still uses the model: keep the reference until it is done.
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(work, return_exceptions=True)
                raise
            self._record(
                model=model_id,
                task="transcription",
                duration_s=time.perf_counter() - started,
                audio_s=len(audio) / TRANSCRIPTION_SAMPLE_RATE,
            )
            return transcript
