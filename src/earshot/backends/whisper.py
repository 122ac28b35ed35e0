"""faster-whisper (CTranslate2) speech-to-text behind the cache's Backend protocol.

Everything here blocks: the cache calls `load`/`unload` in worker threads, and the API runs
`WhisperHandle.transcribe` (or pulls `stream` segment by segment) in worker threads too. A handle can serve
several requests at once (CTranslate2 queues them over `num_workers` workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from earshot.backends._common import is_out_of_memory, spec_footprint
from earshot.backends.errors import (
    InvalidInput,
    ModelUnloaded,
    UnsupportedLanguage,
    UnsupportedTask,
)
from earshot.cache.protocol import BackendOutOfMemory
from earshot.models.hub import download, local_path
from earshot.options import TRANSCRIPTION_SAMPLE_RATE, TranscribeOptions
from earshot.types import ModelSpec, Segment, Transcript, Word

__all__ = [
    "SAMPLE_RATE",
    "Segment",
    "SegmentStream",
    "Transcript",
    "WhisperBackend",
    "WhisperHandle",
    "Word",
    "resolve_device",
]

#: Whisper takes 16 kHz mono float32 audio.
SAMPLE_RATE = TRANSCRIPTION_SAMPLE_RATE

# OpenAI: "If set to 0, the model will use log probability to automatically increase the temperature
# until certain thresholds are hit" - faster-whisper's fallback schedule.
_FALLBACK_TEMPERATURES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# Long audio is transcribed in windows of at most this many seconds, one after the other, so memory
# (faster-whisper computes the log-mel features of all the audio it is given at once: about 1 MB
# per second of audio) grows with the window, not with the file. Each cut is placed at the quietest
# 20 ms frame of the window's last `_CUT_SEARCH_S` seconds, so it falls between words where there is
# a pause; segment and word timestamps are shifted by the window's start.
WINDOW_SECONDS = 300.0
_CUT_SEARCH_S = 10.0
_CUT_FRAME = 320  # samples: 20 ms at 16 kHz

# How long `unload` keeps asking CTranslate2 to free the weights while it reports a batch in flight.
_UNLOAD_RETRY_S = 1.0


def resolve_device(device: str) -> str:
    """`auto` -> "cuda" when CTranslate2 sees a CUDA device, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:  # no CUDA driver, broken install: run on CPU
        return "cpu"


def _convert_segment(seg: Any) -> Segment:
    words = None
    if seg.words is not None:
        words = [
            Word(start=float(w.start), end=float(w.end), word=str(w.word), probability=float(w.probability))
            for w in seg.words
        ]
    return Segment(
        id=int(seg.id),
        start=float(seg.start),
        end=float(seg.end),
        text=str(seg.text),
        tokens=[int(t) for t in seg.tokens],
        temperature=float(seg.temperature if seg.temperature is not None else 0.0),
        avg_logprob=float(seg.avg_logprob),
        compression_ratio=float(seg.compression_ratio),
        no_speech_prob=float(seg.no_speech_prob),
        words=words,
        seek=int(getattr(seg, "seek", 0)),
    )


def _bounds(
    samples: npt.NDArray[np.float32] | None, n: int, window: int, search: int
) -> Iterator[tuple[int, int]]:
    start = 0
    while n - start > window:
        end = start + window
        if samples is not None and search >= _CUT_FRAME:
            tail = samples[end - search : end]
            frames = tail[: len(tail) // _CUT_FRAME * _CUT_FRAME].reshape(-1, _CUT_FRAME)
            quiet = int(np.argmin(np.einsum("ij,ij->i", frames, frames)))
            end = end - search + quiet * _CUT_FRAME + _CUT_FRAME // 2
        yield start, end
        start = end
    yield start, n


def _shifted(seg: Segment, offset: float, index: int) -> Segment:
    words = None
    if seg.words is not None:
        words = [
            Word(start=w.start + offset, end=w.end + offset, word=w.word, probability=w.probability)
            for w in seg.words
        ]
    return dataclasses.replace(seg, id=index, start=seg.start + offset, end=seg.end + offset, words=words)


class SegmentStream(Iterator[Segment]):
    """The segments of one transcription, decoded as they are pulled (each `next()` blocks while the
    model decodes the next window). `language`, `language_probability` and `duration` are known from
    the start. `close()` (or dropping it) stops decoding."""

    def __init__(
        self, generator: Iterator[Any], info: Any, model_id: str, *, duration: float | None = None
    ) -> None:
        self._generator = generator
        self._model_id = model_id
        self.language: str = str(info.language)
        self.language_probability: float = float(info.language_probability)
        self.duration: float = float(info.duration) if duration is None else duration

    def __iter__(self) -> SegmentStream:
        return self

    def __next__(self) -> Segment:
        try:
            seg = next(self._generator)
        except StopIteration:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise BackendOutOfMemory(
                    f"{self._model_id}: out of memory while transcribing: {exc}"
                ) from exc
            raise
        return seg if isinstance(seg, Segment) else _convert_segment(seg)

    def transcript(self, segments: list[Segment]) -> Transcript:
        """The whole transcript of this stream, given every segment it yielded."""
        return Transcript(
            text="".join(s.text for s in segments).strip(),
            language=self.language,
            duration=self.duration,
            segments=segments,
            language_probability=self.language_probability,
        )

    def close(self) -> None:
        close = getattr(self._generator, "close", None)
        if callable(close):
            close()


class WhisperHandle:
    """A loaded faster-whisper model: what the cache hands the API."""

    def __init__(self, model: Any, *, model_id: str, device: str, compute_type: str) -> None:
        self._model: Any = model
        self.model_id = model_id
        self.device = device
        # what CTranslate2 chose ("auto"/"default" resolved, e.g. int8_float32 on CPU)
        self.compute_type = str(getattr(model.model, "compute_type", compute_type))
        self.multilingual: bool = bool(model.model.is_multilingual)
        self.supported_languages: frozenset[str] = frozenset(model.supported_languages)
        self._lock = threading.Lock()
        self.window_seconds = WINDOW_SECONDS

    @property
    def model(self) -> Any:
        """The faster_whisper.WhisperModel (raises `ModelUnloaded` after unload)."""
        model = self._model
        if model is None:
            raise ModelUnloaded(f"model {self.model_id!r} was unloaded")
        return model

    def _release(self) -> Any:
        with self._lock:
            model, self._model = self._model, None
        return model

    def _check(self, audio: npt.ArrayLike, options: TranscribeOptions) -> npt.NDArray[np.float32]:
        """What only the loaded model can tell: can it translate, does it know the language? The
        option values themselves were checked by TranscribeOptions."""
        if options.task == "translate" and not self.multilingual:
            raise UnsupportedTask(
                f"The model {self.model_id!r} is English-only and cannot translate; use a multilingual model "
                "such as faster-whisper-base."
            )
        language = options.language
        if language is not None and language not in self.supported_languages:
            shown = language[:20]
            if not self.multilingual:
                raise UnsupportedLanguage(
                    f"model {self.model_id!r} is English-only; language {shown!r} is not supported"
                )
            raise UnsupportedLanguage(f"unknown language {shown!r}; expected an ISO-639-1 code such as 'en'")
        samples = np.asarray(audio, dtype=np.float32)
        if samples.ndim != 1:
            raise InvalidInput(f"expected mono audio (a 1-D array), got shape {samples.shape}")
        if samples.size == 0:
            raise InvalidInput("the audio is empty")
        return np.ascontiguousarray(samples)

    def stream(
        self, audio: npt.ArrayLike, options: TranscribeOptions | None = None, *, beam_size: int = 5
    ) -> SegmentStream:
        """Start a transcription (feature extraction and language detection run now) and return the
        segments as an iterator that decodes each one when pulled. Blocking."""
        options = options or TranscribeOptions()
        if beam_size < 1:
            raise InvalidInput("beam_size must be at least 1")
        samples = self._check(audio, options)
        temperatures = _FALLBACK_TEMPERATURES if options.temperature == 0 else (float(options.temperature),)
        model = self.model
        language = options.language
        kwargs: dict[str, Any] = {
            "task": options.task,
            "beam_size": beam_size,
            "temperature": list(temperatures),
            "initial_prompt": options.prompt,
            "word_timestamps": options.word_timestamps,
            "vad_filter": options.vad_filter,
            "hotwords": options.hotwords,
        }
        window = int(self.window_seconds * SAMPLE_RATE)
        bounds = list(_bounds(samples, samples.size, window, int(_CUT_SEARCH_S * SAMPLE_RATE)))
        first, end = bounds[0]
        generator, info = self._transcribe(model, samples[first:end], language, kwargs)
        if len(bounds) == 1:
            return SegmentStream(iter(generator), info, self.model_id)

        pending: list[Iterator[Any]] = [generator]  # the first window's, started above
        del generator

        def windows() -> Iterator[Segment]:
            # Later windows keep the language of the first (detected there, or the one asked for).
            # One window's generator (and so its features) is alive at a time: each is dropped
            # before the next is started.
            index = 0
            for start, end in bounds:
                segments = pending.pop() if pending else None
                if segments is None:
                    segments = self._transcribe(model, samples[start:end], info.language, kwargs)[0]
                try:
                    for seg in segments:
                        yield _shifted(_convert_segment(seg), start / SAMPLE_RATE, index)
                        index += 1
                finally:
                    close = getattr(segments, "close", None)
                    if callable(close):
                        close()
                    del segments

        return SegmentStream(windows(), info, self.model_id, duration=samples.size / SAMPLE_RATE)

    def _transcribe(
        self, model: Any, samples: npt.NDArray[np.float32], language: str | None, options: dict[str, Any]
    ) -> tuple[Iterator[Any], Any]:
        try:
            generator, info = model.transcribe(samples, language=language, **options)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise BackendOutOfMemory(f"{self.model_id}: out of memory while transcribing: {exc}") from exc
            raise
        return iter(generator), info

    def transcribe(
        self, audio: npt.ArrayLike, options: TranscribeOptions | None = None, *, beam_size: int = 5
    ) -> Transcript:
        """Transcribe (or translate into English) the whole input. Blocking."""
        stream = self.stream(audio, options, beam_size=beam_size)
        try:
            return stream.transcript(list(stream))
        finally:
            stream.close()


class WhisperBackend:
    """Loads faster-whisper models. `spec.options` may override `device`, `device_index`,
    `compute_type`, `cpu_threads` and `num_workers` per model."""

    def __init__(
        self,
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = 0,
        num_workers: int = 1,
    ) -> None:
        self.device = device
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.num_workers = num_workers

    def fetch(
        self, spec: ModelSpec, *, timeout: float | None = None, cancel: threading.Event | None = None
    ) -> None:
        """Download what `load` needs (a hub model's files, into the HF cache); a no-op for a local
        model. The cache calls it before `load`, under model_download_timeout; `timeout` / `cancel`
        stop a download in progress at its next chunk."""
        download(spec, timeout=timeout, cancel=cancel)

    def load(self, spec: ModelSpec) -> WhisperHandle:
        from faster_whisper import WhisperModel

        path = Path(local_path(spec))
        if not (path / "model.bin").is_file():
            # WhisperModel would take a missing directory for a model name and try to download it
            raise FileNotFoundError(f"model {spec.id!r}: no CTranslate2 model.bin in {path}")
        opts = spec.options
        device = resolve_device(str(opts.get("device", self.device)))
        compute_type = str(opts.get("compute_type", self.compute_type))
        try:
            model = WhisperModel(
                str(path),
                device=device,
                device_index=int(opts.get("device_index", 0)),
                compute_type=compute_type,
                cpu_threads=int(opts.get("cpu_threads", self.cpu_threads)),
                num_workers=int(opts.get("num_workers", self.num_workers)),
                local_files_only=True,
            )
        except Exception as exc:
            if is_out_of_memory(exc):
                raise BackendOutOfMemory(f"{spec.id}: out of memory loading on {device}: {exc}") from exc
            raise
        return WhisperHandle(model, model_id=spec.id, device=device, compute_type=compute_type)

    def unload(self, handle: WhisperHandle) -> None:
        model = handle._release()
        if model is None:
            return
        inner = getattr(model, "model", None)
        unload_model = getattr(inner, "unload_model", None)
        if callable(unload_model):
            # Frees the weights now (GPU memory included) rather than whenever the last reference goes.
            # CTranslate2 skips the unload, silently, while its pool still counts a batch as active or
            # another thread holds the model's lock: that count drops a moment after a result is
            # handed back, so an unload right after the last inference can be skipped. Try again
            # for a short while.
            deadline = time.monotonic() + _UNLOAD_RETRY_S
            while True:
                with contextlib.suppress(Exception):  # best effort: the references go below anyway
                    unload_model()
                if not getattr(inner, "model_is_loaded", False) or time.monotonic() >= deadline:
                    break
                time.sleep(0.005)
        del inner, model

    def footprint(self, spec: ModelSpec) -> int:
        return spec_footprint(spec)
