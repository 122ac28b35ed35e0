"""Encode synthesized audio (float32 mono) into the formats of OpenAI's speech endpoint.

`encode_audio()` encodes a whole clip at once; `StreamEncoder` encodes as the audio is made, so the
API can send the first sentence while the next is synthesized: each `write()` returns the bytes the
muxer has produced so far, `close()` the rest.

| format | container / codec | notes |
| --- | --- | --- |
| wav  | RIFF, PCM 16-bit | streamed: the header claims the maximum length (readers stop at EOF) |
| pcm  | none, 16-bit little-endian | always 24 kHz mono, as OpenAI documents |
| mp3  | MP3, libmp3lame | |
| opus | Ogg, libopus | 48 kHz (libopus accepts 8/12/16/24/48 kHz; 48 kHz for everything) |
| aac  | ADTS, FFmpeg's aac | |
| flac | FLAC | streamed: STREAMINFO cannot be rewritten, so it gives no total length |
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from typing import Final, Literal, get_args

import av
import av.error
import numpy as np
import numpy.typing as npt

__all__ = ["CONTENT_TYPES", "FORMATS", "PCM_SAMPLE_RATE", "AudioFormat", "StreamEncoder", "encode_audio"]

AudioFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
FORMATS: Final[tuple[str, ...]] = get_args(AudioFormat)

#: Content-Type of each response format (what OpenAI's API sends).
CONTENT_TYPES: Final[dict[str, str]] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

#: The `pcm` format is raw 16-bit little-endian mono at this rate, whatever the model's rate.
PCM_SAMPLE_RATE: Final = 24000

# container, codec, sample rate (None: the input's), bit rate
_CODECS: Final[dict[str, tuple[str, str, int | None, int | None]]] = {
    "mp3": ("mp3", "libmp3lame", None, 128_000),
    "opus": ("ogg", "libopus", 48000, 64_000),
    "aac": ("adts", "aac", None, 128_000),
    "flac": ("flac", "flac", None, None),
}


def _check_format(fmt: str) -> AudioFormat:
    if fmt not in FORMATS:
        raise ValueError(f"unsupported audio format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt  # type: ignore[return-value]


def _as_samples(samples: npt.ArrayLike) -> npt.NDArray[np.float32]:
    arr = np.asarray(samples, dtype=np.float32)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"expected mono samples (a 1-D array), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0)
    return arr


def _to_int16(samples: npt.NDArray[np.float32]) -> bytes:
    pcm = np.clip(samples, -1.0, 1.0) * 32767.0
    return np.round(pcm).astype("<i2").tobytes()


def _wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """RIFF/WAVE header for 16-bit mono PCM. `data_bytes=None`: unknown length (streaming)."""
    data = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        1,  # channels
        sample_rate,
        sample_rate * 2,
        2,  # block align
        16,  # bits per sample
        b"data",
        data,
    )


class _Resampler:
    """float32 mono at one rate -> float32 mono at another, in pieces (keeps state across writes)."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        self.rate_in = rate_in
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
        self._pts = 0

    def _collect(self, frames: list[av.AudioFrame]) -> npt.NDArray[np.float32]:
        parts = [f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def write(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if not samples.size:
            return np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.rate_in
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.rate_in)
        self._pts += samples.size
        return self._collect(self._resampler.resample(frame))

    def close(self) -> npt.NDArray[np.float32]:
        return self._collect(self._resampler.resample(None))


class _Sink:
    """A write-only, non-seekable file object whose contents are taken as they come."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class StreamEncoder:
    """Encode float32 mono audio piece by piece: `write()` returns the bytes ready so far, `close()` the
    rest. The concatenation of everything returned is one valid file (or raw stream, for pcm).

    Not thread-safe: one encoder belongs to one response. `sample_rate` is the input's rate."""

    def __init__(self, fmt: str, sample_rate: int, *, _seekable: bool = False) -> None:
        self.format: AudioFormat = _check_format(fmt)
        if sample_rate <= 0:
            raise ValueError("sample_rate must be positive")
        self.sample_rate = sample_rate
        self.content_type = CONTENT_TYPES[self.format]
        self._closed = False
        self._header_pending = self.format == "wav"
        self._resampler: _Resampler | None = None
        self._container: av.container.OutputContainer | None = None
        self._stream: av.AudioStream | None = None
        self._sink: _Sink | io.BytesIO | None = None
        self._pts = 0
        if self.format == "pcm" and sample_rate != PCM_SAMPLE_RATE:
            self._resampler = _Resampler(sample_rate, PCM_SAMPLE_RATE)
        if self.format in _CODECS:
            container_fmt, codec, rate, bit_rate = _CODECS[self.format]
            out_rate = rate or sample_rate
            # encode_audio() uses a seekable buffer so muxers can finish their headers (FLAC
            # STREAMINFO total, MP3 Xing/Info frame); a stream cannot seek back.
            self._sink = io.BytesIO() if _seekable else _Sink()
            options = {} if _seekable else {"flush_packets": "1"}
            if self.format == "opus":
                options["page_duration"] = "100000"  # µs: flush Ogg pages often, for low latency
            try:
                self._container = av.open(self._sink, mode="w", format=container_fmt, options=options)
                stream = self._container.add_stream(codec, rate=out_rate)
                assert isinstance(stream, av.AudioStream)
                stream.layout = "mono"
                if bit_rate is not None:
                    stream.bit_rate = bit_rate
                if self.format == "flac":
                    stream.format = "s16"
                self._stream = stream
            except (av.error.FFmpegError, ValueError) as exc:
                raise RuntimeError(f"cannot start the {self.format} encoder: {exc}") from exc

    def write(self, samples: npt.ArrayLike) -> bytes:
        """Encode the next piece of audio; returns the bytes ready so far (maybe empty)."""
        if self._closed:
            raise ValueError("write() on a closed StreamEncoder")
        arr = _as_samples(samples)
        out = self._header()
        if self.format == "wav":
            return out + _to_int16(arr)
        if self.format == "pcm":
            if self._resampler is not None:
                arr = self._resampler.write(arr)
            return out + _to_int16(arr)
        return out + self._encode(arr)

    def close(self) -> bytes:
        """Flush the encoder and finish the container; returns the last bytes. Idempotent."""
        if self._closed:
            return b""
        self._closed = True
        out = self._header()
        if self.format == "pcm" and self._resampler is not None:
            return out + _to_int16(self._resampler.close())
        if self._container is None or self._stream is None or self._sink is None:
            return out
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()
        if isinstance(self._sink, io.BytesIO):
            return out + self._sink.getvalue()
        return out + self._sink.take()

    def _header(self) -> bytes:
        if self._header_pending:
            self._header_pending = False
            return _wav_header(self.sample_rate, None)
        return b""

    def _encode(self, arr: npt.NDArray[np.float32]) -> bytes:
        assert self._container is not None
        assert self._stream is not None
        assert self._sink is not None
        if arr.size:
            frame = av.AudioFrame.from_ndarray(arr.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts
            frame.time_base = Fraction(1, self.sample_rate)
            self._pts += arr.size
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        if isinstance(self._sink, _Sink):
            return self._sink.take()
        return b""

    def __enter__(self) -> StreamEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self._closed = True
            if self._container is not None:
                self._container.close()


def encode_audio(samples: npt.ArrayLike, sample_rate: int, fmt: str) -> bytes:
    """Encode a whole clip of float32 mono samples (values in [-1, 1]) at `sample_rate` into `fmt`."""
    fmt = _check_format(fmt)
    arr = _as_samples(samples)
    if fmt == "wav":
        data = _to_int16(arr)
        return _wav_header(sample_rate, len(data)) + data
    encoder = StreamEncoder(fmt, sample_rate, _seekable=True)
    return encoder.write(arr) + encoder.close()
