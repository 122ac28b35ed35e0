"""Server VAD: Silero VAD (the ONNX model faster-whisper ships) run frame by frame, and the turn
logic of the Realtime protocol's `server_vad` on top of its speech probabilities.

- `SileroVad`: the model, loaded once per process from `faster_whisper/assets/silero_vad_v6.onnx`
  (no download) with onnxruntime, as `faster_whisper.vad.SileroVADModel` runs it: frames of 512
  samples at 16 kHz (32 ms), each preceded by the last 64 samples of the frame before, and the LSTM
  state (`h`, `c`) carried from call to call. One InferenceSession serves every session (its `run`
  is thread-safe); each session has its own `VadStream` (state, context, partial frame).
- `TurnDetector`: pure logic over the probabilities, per the session's `threshold`,
  `prefix_padding_ms` and `silence_duration_ms`: speech starts at the first frame at or above the
  threshold (the turn then begins `prefix_padding_ms` earlier), and stops once the probability has
  stayed below the silence threshold (`threshold - 0.15`, as faster-whisper's VAD uses) for
  `silence_duration_ms`. Between the two thresholds speech goes on.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from earshot.options import TRANSCRIPTION_SAMPLE_RATE

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees before each frame
FRAME_MS = FRAME * 1000 // TRANSCRIPTION_SAMPLE_RATE  # 32
NEG_THRESHOLD_GAP = 0.15

PCM = npt.NDArray[np.float32]


def silero_path() -> str:
    from faster_whisper.utils import get_assets_path

    return os.path.join(get_assets_path(), "silero_vad_v6.onnx")


class SileroVad:
    """The Silero VAD ONNX model (one per process; `load()` is cached)."""

    _shared: SileroVad | None = None
    _lock = threading.Lock()

    def __init__(self, path: str | None = None) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 4
        self.session: Any = onnxruntime.InferenceSession(
            path or silero_path(), providers=["CPUExecutionProvider"], sess_options=opts
        )

    @classmethod
    def load(cls) -> SileroVad:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def stream(self) -> VadStream:
        return VadStream(self)


class VadStream:
    """Speech probabilities of one session's audio, one per complete 512-sample frame."""

    def __init__(self, model: SileroVad) -> None:
        self._model = model
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def feed(self, samples: PCM) -> npt.NDArray[np.float32]:
        """Probabilities for the complete frames `samples` (and what was left over before) make."""
        audio = np.concatenate([self._pending, samples]) if self._pending.size else samples
        n = len(audio) // FRAME
        self._pending = audio[n * FRAME :].copy()
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        frames = audio[: n * FRAME].reshape(n, FRAME)
        contexts = np.empty((n, CONTEXT), dtype=np.float32)
        contexts[0] = self._context
        if n > 1:
            contexts[1:] = frames[:-1, -CONTEXT:]
        self._context = frames[-1, -CONTEXT:].copy()
        batch = np.ascontiguousarray(np.concatenate([contexts, frames], axis=1), dtype=np.float32)
        probs, self._h, self._c = self._model.session.run(None, {"input": batch, "h": self._h, "c": self._c})
        return np.asarray(probs, dtype=np.float32).reshape(-1)


@dataclass(frozen=True, slots=True)
class VadSettings:
    """`turn_detection` of type `server_vad` (the protocol's defaults)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True, slots=True)
class SpeechStart:
    at: int  # sample index (16 kHz session timeline) where the turn begins, prefix padding included
    detected_at: int  # the first speech frame


@dataclass(frozen=True, slots=True)
class SpeechStop:
    at: int  # sample index where the turn ends (the silence that ended it included)


class TurnDetector:
    """Speech start/stop from per-frame probabilities. Positions are samples on the session's 16 kHz
    timeline (all audio received since the session started, or since the last `reset`)."""

    def __init__(self, settings: VadSettings, start: int = 0) -> None:
        self.settings = settings
        rate = TRANSCRIPTION_SAMPLE_RATE
        self.prefix = self._prefix = settings.prefix_padding_ms * rate // 1000
        self._silence_frames = max(1, -(-settings.silence_duration_ms // FRAME_MS))  # ceil
        self._neg = max(settings.threshold - NEG_THRESHOLD_GAP, 0.01)
        self.position = start  # sample index of the next frame
        self.floor = start  # the earliest sample a turn may begin at (after the previous turn)
        self.speaking = False
        self._silent = 0

    def reset(self, floor: int) -> None:
        """Not speaking; the next turn begins at `floor` or later (after a commit or a clear)."""
        self.floor = floor
        self.speaking = False
        self._silent = 0

    def feed(self, probs: npt.NDArray[np.float32]) -> list[SpeechStart | SpeechStop]:
        """Events of these frames, in order."""
        events: list[SpeechStart | SpeechStop] = []
        threshold = self.settings.threshold
        for p in probs.tolist():
            frame_start = self.position
            self.position += FRAME
            if not self.speaking:
                if p >= threshold:
                    self.speaking = True
                    self._silent = 0
                    events.append(SpeechStart(max(self.floor, frame_start - self._prefix), frame_start))
            elif p < self._neg:
                self._silent += 1
                if self._silent >= self._silence_frames:
                    self.speaking = False
                    self._silent = 0
                    self.floor = self.position
                    events.append(SpeechStop(self.position))
            else:
                self._silent = 0
        return events
