"""Decode client audio (any container and codec PyAV reads) to float32 mono PCM at one sample rate.

Client bytes are only ever read through a file object: they are never turned into a path or a URL,
and the demuxer may not open anything else (playlists and concat lists reference other files): the
protocol whitelist is empty, the `io_open` hook refuses every open, and only audio containers are
accepted (a concat list opens its first entry itself, past `io_open`; the whitelist stops that).
The container's own facts are checked before anything is decoded: more than `MAX_CHANNELS`
channels, a sample rate under `MIN_SAMPLE_RATE` (a 1 Hz header turns each input sample into 16,000
output samples) or a claimed duration over `max_seconds` are refused. Claims can lie in the other
direction, so samples are also counted as they are decoded, and decoding stops as soon as
`max_seconds` is passed: the output, float32 at `sample_rate`, is the bound on what one decode holds
(64 KB per second of audio at 16 kHz, 3.75 MiB per minute).

Frames are resampled to *packed* float (one plane, channels interleaved) and down-mixed here: PyAV's
`to_ndarray` of a planar frame with more than 8 channels reads past FFmpeg's 8 inline data pointers
and crashes the process (SIGSEGV; 7.1 audio is enough). This module runs in the decode worker
processes of `earshot.audio.pool` anyway, so a crash that is still left costs one worker, not the
server.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any, BinaryIO, NoReturn

import av
import av.error
import numpy as np
import numpy.typing as npt

from earshot.audio.errors import AudioDecodeError, AudioTooLong

__all__ = [
    "ALLOWED_CONTAINERS",
    "MAX_CHANNELS",
    "MIN_SAMPLE_RATE",
    "AudioDecodeError",
    "AudioTooLong",
    "decode_audio",
]

#: FFmpeg's resampler (swresample) handles at most 64 channels; more are refused up front.
MAX_CHANNELS = 64
#: Lowest input sample rate accepted: below it, resampling multiplies the data (x16 at 1 kHz).
MIN_SAMPLE_RATE = 1000

AudioSource = BinaryIO | bytes | bytearray | memoryview | os.PathLike[str]

#: Demuxers accepted for input (PyAV's `container.format.name`). Everything an OpenAI client sends
#: (flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm) and the common audio containers besides.
ALLOWED_CONTAINERS: frozenset[str] = frozenset(
    {
        "wav",
        "w64",
        "flac",
        "mp3",
        "ogg",
        "mov,mp4,m4a,3gp,3g2,mj2",
        "matroska,webm",
        "aac",
        "loas",
        "aiff",
        "caf",
        "au",
        "amr",
        "amrnb",
        "amrwb",
        "asf",
        "avi",
        "flv",
        "mpeg",
        "mpegts",
        "wv",
        "ape",
        "tta",
        "ac3",
        "eac3",
        "dts",
        "mlp",
        "truehd",
        "voc",
        "gsm",
    }
)


def _refuse_open(url: str, flags: int, options: dict[str, Any]) -> NoReturn:
    """FFmpeg asks to open another resource while demuxing (a playlist entry, a concat item...)."""
    raise PermissionError(f"input tried to open another resource ({url!r}); refused")


def _open(source: AudioSource) -> tuple[BinaryIO, bool]:
    if isinstance(source, bytes | bytearray | memoryview):
        if not len(source):
            raise AudioDecodeError("the input is empty")
        return io.BytesIO(bytes(source)), True
    if isinstance(source, os.PathLike):
        return open(os.fspath(source), "rb"), True
    if isinstance(source, str):
        raise TypeError("decode_audio takes bytes, a binary file object or a pathlib.Path, not str")
    if hasattr(source, "read"):
        return source, False
    raise TypeError(f"decode_audio cannot read a {type(source).__name__}")


def _frames(container: av.container.InputContainer, stream: av.AudioStream) -> Iterator[av.AudioFrame]:
    """The stream's decoded frames; a corrupt packet is skipped (as ffmpeg does), not fatal."""
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            continue
        yield from frames


def decode_audio(
    source: AudioSource,
    *,
    sample_rate: int = 16000,
    max_seconds: float | None = None,
) -> npt.NDArray[np.float32]:
    """Decode the first audio stream of `source` to float32 mono samples in [-1, 1] at `sample_rate`.
    Channels are averaged (a true mean, so the mix never clips).

    `source` is bytes, a binary file object (read from its current position), or a `pathlib.Path`
    (server-side files only; a `str` is refused, so client text can never become a path).
    Raises `AudioDecodeError` for input that cannot be decoded, has no audio stream or holds no
    samples, and `AudioTooLong` as soon as more than `max_seconds` have been decoded.
    """
    if sample_rate <= 0:
        raise ValueError("sample_rate must be positive")
    limit = None if max_seconds is None else max(0, int(max_seconds * sample_rate))
    fileobj, owned = _open(source)
    chunks: list[npt.NDArray[np.float32]] = []
    total = 0
    try:
        try:
            container = av.open(
                fileobj,
                mode="r",
                # No protocol at all for anything the input names (a concat list's entries...): the
                # main input is our file object, which needs none.
                options={"protocol_whitelist": "none"},
                io_open=_refuse_open,
                metadata_errors="replace",
            )
        except (av.error.FFmpegError, PermissionError, UnicodeDecodeError, ValueError) as exc:
            raise AudioDecodeError(_reason(exc)) from exc
        with container:
            if container.format.name not in ALLOWED_CONTAINERS:
                raise AudioDecodeError(f"unsupported container format {container.format.name!r}")
            if not container.streams.audio:
                raise AudioDecodeError("the input has no audio stream")
            stream = container.streams.audio[0]
            _check_header(container, stream, max_seconds)
            resampler: av.AudioResampler | None = None

            def take(frames: list[av.AudioFrame]) -> None:
                nonlocal total
                for out in frames:
                    channels = out.layout.nb_channels
                    if channels > MAX_CHANNELS:
                        raise AudioDecodeError(f"{channels} channels; at most {MAX_CHANNELS} are accepted")
                    packed = out.to_ndarray().reshape(-1)  # one plane, samples interleaved
                    if channels > 1:
                        packed = packed.reshape(-1, channels).mean(axis=1, dtype=np.float32)
                    data = np.asarray(packed, dtype=np.float32).reshape(-1)
                    if not data.size:
                        continue
                    total += data.size
                    if limit is not None and total > limit:
                        assert max_seconds is not None
                        raise AudioTooLong(max_seconds)
                    chunks.append(data)

            try:
                for frame in _frames(container, stream):
                    if resampler is None:
                        resampler = av.AudioResampler(format="flt", rate=sample_rate)
                    try:
                        take(resampler.resample(frame))
                    except ValueError as exc:  # the stream changed rate/layout/format mid-way
                        if isinstance(exc, AudioTooLong):
                            raise
                        take(resampler.resample(None))
                        resampler = av.AudioResampler(format="flt", rate=sample_rate)
                        take(resampler.resample(frame))
                if resampler is not None:
                    take(resampler.resample(None))
            except AudioTooLong:
                raise
            except (av.error.FFmpegError, PermissionError, ValueError, MemoryError) as exc:
                raise AudioDecodeError(_reason(exc)) from exc
    finally:
        if owned:
            fileobj.close()
    if total == 0:
        raise AudioDecodeError("the input holds no audio samples")
    samples = np.concatenate(chunks) if len(chunks) > 1 else chunks[0].copy()
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples


def _check_header(
    container: av.container.InputContainer, stream: av.AudioStream, max_seconds: float | None
) -> None:
    """Refuse from what the container says, before decoding a sample."""
    channels = stream.channels
    if channels > MAX_CHANNELS:
        raise AudioDecodeError(f"{channels} channels; at most {MAX_CHANNELS} are accepted")
    rate = stream.rate
    if rate and rate < MIN_SAMPLE_RATE:
        raise AudioDecodeError(f"sample rate {rate} Hz; at least {MIN_SAMPLE_RATE} Hz is accepted")
    if max_seconds is None:
        return
    seconds: float | None = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000
    if seconds is not None and seconds > max_seconds:
        raise AudioTooLong(max_seconds)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, av.error.FFmpegError):
        text = exc.strerror or str(exc)
        return text[0].lower() + text[1:] if text else type(exc).__name__
    return str(exc) or type(exc).__name__
