"""The baselines: faster-whisper and kokoro-onnx called directly, in this process, with the settings
the server's backends use (kept in step by reading the backends' own defaults)."""

from __future__ import annotations

import functools
import io
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MODELS_DIR

#: faster-whisper's temperature fallback schedule: what the server passes for temperature 0 (the
#: OpenAI default), as WhisperHandle does.
FALLBACK_TEMPERATURES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
#: WhisperHandle.transcribe's default beam size (the API does not change it).
BEAM_SIZE = 5


def _check_in_step() -> None:
    """Fail loudly if the backend's options drifted from what the baseline mirrors."""
    import inspect

    from earshot.backends import whisper

    schedule = getattr(whisper, "_FALLBACK_TEMPERATURES", None)
    if schedule is not None and list(schedule) != FALLBACK_TEMPERATURES:
        raise RuntimeError(
            f"WhisperHandle's temperature schedule changed: {schedule}; update bench/direct.py"
        )
    beam = inspect.signature(whisper.WhisperHandle.transcribe).parameters["beam_size"].default
    if beam != BEAM_SIZE:
        raise RuntimeError(f"WhisperHandle's default beam_size changed to {beam}; update bench/direct.py")


def whisper_options() -> dict[str, Any]:
    """WhisperModel constructor arguments exactly as WhisperBackend.load passes them by default."""
    from earshot.backends.whisper import WhisperBackend, resolve_device

    backend = WhisperBackend()
    return {
        "device": resolve_device(backend.device),
        "device_index": 0,
        "compute_type": backend.compute_type,
        "cpu_threads": backend.cpu_threads,
        "num_workers": backend.num_workers,
        "local_files_only": True,
    }


def load_whisper(model: str, *, own_thread: bool = True) -> Any:
    """WhisperModel(path, ...) as the server's backend constructs it, by default in a thread that
    ends with the construction, as earshot runs its loads (`run_in_own_thread` in
    earshot.inference.workers says why: a model built on a thread that lives on, such as the main
    thread, infers about 25% slower on a small machine, libgomp's doing). `own_thread=False`
    builds it in the calling thread, as a plain script would."""
    from faster_whisper import WhisperModel

    _check_in_step()
    build = functools.partial(WhisperModel, str(MODELS_DIR / model), **whisper_options())
    if not own_thread:
        return build()
    with ThreadPoolExecutor(max_workers=1) as pool:  # leaving joins the thread: it has ended
        return pool.submit(build).result()


def decode(path: Path) -> np.ndarray:
    """The file decoded to 16 kHz mono float32 by earshot's decoder, as the API decodes an upload
    (so both sides transcribe the very same samples: faster-whisper's own decoder resamples a little
    differently, which can change the transcript and with it the work)."""
    from earshot.audio.decode import decode_audio

    return np.ascontiguousarray(decode_audio(path, sample_rate=16000), dtype=np.float32)


def transcribe_file(model: Any, path: Path) -> str:
    """Decode the file (`decode`) and transcribe it with the options the server uses for a plain
    json request; every segment drained, text joined as the server does."""
    segments, _info = model.transcribe(
        decode(path),
        language=None,
        task="transcribe",
        beam_size=BEAM_SIZE,
        temperature=list(FALLBACK_TEMPERATURES),
        initial_prompt=None,
        word_timestamps=False,
        vad_filter=False,
        hotwords=None,
    )
    return "".join(s.text for s in segments).strip()


def compute_type(model: Any) -> str:
    """What CTranslate2 resolved `compute_type="auto"` to (e.g. int8_float32 on CPU)."""
    return str(getattr(model.model, "compute_type", "?"))


def load_kokoro(model: str) -> Any:
    """kokoro_onnx.Kokoro on an onnxruntime session made as KokoroBackend makes it (same providers,
    default session options)."""
    import onnxruntime as ort
    from kokoro_onnx import Kokoro

    from earshot.backends.kokoro import KokoroBackend

    backend = KokoroBackend()
    _device, providers = KokoroBackend._providers(backend.device)
    directory = MODELS_DIR / model
    onnx = next(iter(sorted(directory.glob("*.onnx"))))
    voices = directory / "voices.npz"
    opts = ort.SessionOptions()
    if backend.cpu_threads > 0:
        opts.intra_op_num_threads = backend.cpu_threads
    session = ort.InferenceSession(str(onnx), sess_options=opts, providers=providers)
    return Kokoro.from_session(session, str(voices))


def voice_style(kokoro: Any, voice: str) -> np.ndarray:
    """The voice's style array, read once (the server's handle keeps plain arrays too)."""
    return np.asarray(kokoro.get_voice_style(voice), dtype=np.float32)


def to_wav(samples: np.ndarray, rate: int) -> bytes:
    """16-bit PCM WAV, as a client of the library would write it (stdlib wave)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def wav_seconds(body: bytes) -> float:
    """Duration of a WAV body (data bytes / 2 / rate; the server's header may claim more)."""
    if body[:4] != b"RIFF":
        return float("nan")
    rate = int.from_bytes(body[24:28], "little")
    idx = body.find(b"data")
    return (len(body) - idx - 8) / 2 / rate if idx >= 0 and rate else float("nan")
