"""Test audio made from jfk.flac: 16 kHz mono 16-bit PCM and WAV files of it (PyAV decodes)."""

from __future__ import annotations

import struct
from pathlib import Path

import av

RATE = 16000


def wav(samples: bytes, *, claimed_samples: int | None = None, rate: int = RATE) -> bytes:
    """16-bit mono PCM WAV; the header may claim more samples than it holds."""
    n = len(samples) // 2 if claimed_samples is None else claimed_samples
    data_bytes = min(n * 2, 0xFFFFFFFF - 36)
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        *(b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16, b"data", data_bytes),
    )
    return header + samples


def pcm16(flac: Path, rate: int = RATE) -> bytes:
    """The whole of `flac` as mono 16-bit little-endian PCM at `rate` (16 kHz; the Realtime API's
    `audio/pcm` is 24 kHz)."""
    out = bytearray()
    with av.open(str(flac)) as src:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in src.decode(audio=0):
            for piece in resampler.resample(frame):
                out += bytes(piece.planes[0])[: piece.samples * 2]
        for piece in resampler.resample(None):
            out += bytes(piece.planes[0])[: piece.samples * 2]
    return bytes(out)


def clip_wav(flac: Path, seconds: float) -> bytes:
    """The first `seconds` of `flac` as a 16 kHz mono WAV (jfk.flac, 2 s: "And so my fellow")."""
    return wav(pcm16(flac)[: int(RATE * seconds) * 2])
