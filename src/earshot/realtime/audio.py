"""Input audio of a realtime session, decoded and resampled to Whisper's 16 kHz float32 mono.

The formats of the Realtime protocol: `audio/pcm` (16-bit little-endian mono at 24 kHz; the beta
name `pcm16`), `audio/pcmu` (G.711 µ-law at 8 kHz; `g711_ulaw`) and `audio/pcma` (G.711 A-law at
8 kHz; `g711_alaw`). PyAV does the work: FFmpeg's G.711 decoders and its resampler, kept per session
so that chunk boundaries leave no clicks (the resampler carries its filter state from one chunk to
the next).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from earshot.options import TRANSCRIPTION_SAMPLE_RATE

PCM = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class InputFormat:
    """One input format: its protocol name, FFmpeg decoder (None: raw s16le), rate, bytes/sample."""

    type: str  # "audio/pcm", "audio/pcmu", "audio/pcma"
    rate: int
    codec: str | None
    sample_bytes: int

    def seconds(self, nbytes: int) -> float:
        return nbytes / self.sample_bytes / self.rate


PCM16 = InputFormat("audio/pcm", 24_000, None, 2)
PCMU = InputFormat("audio/pcmu", 8_000, "pcm_mulaw", 1)
PCMA = InputFormat("audio/pcma", 8_000, "pcm_alaw", 1)
FORMATS: dict[str, InputFormat] = {f.type: f for f in (PCM16, PCMU, PCMA)}
# The beta protocol's names (`input_audio_format`), accepted too.
BETA_NAMES: dict[str, InputFormat] = {"pcm16": PCM16, "g711_ulaw": PCMU, "g711_alaw": PCMA}


class AudioDecoder:
    """Bytes of one format in, 16 kHz float32 out, chunk by chunk. Not thread-safe (one per session)."""

    def __init__(self, fmt: InputFormat) -> None:
        self.format = fmt
        self._codec: Any = None
        if fmt.codec is not None:
            self._codec = av.CodecContext.create(fmt.codec, "r")
            self._codec.sample_rate = fmt.rate
            self._codec.layout = "mono"
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=TRANSCRIPTION_SAMPLE_RATE)
        self._odd = b""  # a trailing half sample of 16-bit PCM, kept for the next chunk

    def decode(self, data: bytes) -> PCM:
        """The 16 kHz samples for `data` (a few ms of them may come out with the next chunk)."""
        frames: list[Any]
        if self._codec is None:
            data = self._odd + data
            cut = len(data) - len(data) % 2
            data, self._odd = data[:cut], data[cut:]
            if not data:
                return np.zeros(0, np.float32)
            samples = np.frombuffer(data, dtype="<i2").reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = self.format.rate
            frames = [frame]
        else:
            if not data:
                return np.zeros(0, np.float32)
            frames = list(self._codec.decode(av.Packet(data)))
        out = [r.to_ndarray().reshape(-1) for f in frames for r in self._resampler.resample(f)]
        if not out:
            return np.zeros(0, np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
