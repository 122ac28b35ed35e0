"""kokoro-onnx text-to-speech behind the cache's Backend protocol.

Everything here blocks and runs in worker threads. A handle can synthesize for several requests at
once (onnxruntime sessions are thread-safe; kokoro-onnx serializes only espeak phonemization).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from earshot.backends._common import is_out_of_memory, spec_footprint
from earshot.backends.errors import (
    InvalidInput,
    ModelUnloaded,
    UnknownVoice,
    UnsupportedLanguage,
)
from earshot.cache.protocol import BackendOutOfMemory
from earshot.models.files import ONNX_PREFERRED
from earshot.models.hub import cached_snapshot, download, local_path
from earshot.options import MAX_SPEED, MIN_SPEED, SpeechOptions
from earshot.types import ModelSpec

__all__ = [
    "MAX_SPEED",
    "MIN_SPEED",
    "OPENAI_VOICES",
    "SAMPLE_RATE",
    "KokoroBackend",
    "KokoroHandle",
    "split_sentences",
]

SAMPLE_RATE = 24000
#: Floats per style vector of a Kokoro voice (a voice holds one per token position).
STYLE_DIM = 256
# kokoro-onnx accepts 0.5-2.0; beyond, the rest of the factor is applied with FFmpeg's atempo
# (a pitch-preserving time stretch).
_MODEL_MIN_SPEED = 0.5
_MODEL_MAX_SPEED = 2.0

#: OpenAI's voice names and the gender group each maps to when the model has no voice of that name.
OPENAI_VOICES: dict[str, str] = {
    "alloy": "f",
    "echo": "m",
    "fable": "m",
    "onyx": "m",
    "nova": "f",
    "shimmer": "f",
    "ash": "m",
    "ballad": "m",
    "coral": "f",
    "sage": "f",
    "verse": "m",
    "marin": "f",
    "cedar": "m",
}

_DEFAULT_MAX_CHARS = 250
SENTENCE_PAUSE_S = 0.25  # kokoro-onnx's default sentence_pause
DEFAULT_VOICE = "alloy"  # OpenAI requires a voice; without one, the model's voice for "alloy"
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|(?<=[。！？])\s*|\n\s*\n|\n(?=\s*[-*•\d])")
_CLAUSE_END = re.compile(r"(?<=[,;:、，；：—–])\s*")
_ABBREVIATIONS = frozenset(
    {
        *("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig"),
        *("approx", "dept", "est", "inc", "ltd", "co", "mt"),
        *("jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"),
    }
)
_WORDISH = re.compile(r"\w")


def _ends_with_abbreviation(piece: str) -> bool:
    """'Mr.', 'e.g.', an initial like 'J.': a full stop that does not end a sentence."""
    m = re.search(r"(\S+)\.$", piece.rstrip("\"'”’)] "))
    if m is None:
        return False
    word = m.group(1).lower().lstrip("(\"'“‘")
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Split one over-long sentence at clause marks, then at spaces, then anywhere."""
    if len(sentence) <= max_chars:
        return [sentence]
    out: list[str] = []
    for splitter in (_CLAUSE_END, re.compile(r"\s+")):
        pieces = [p for p in splitter.split(sentence) if p]
        if len(pieces) > 1:
            current = ""
            for piece in pieces:
                joined = f"{current} {piece}".strip() if current else piece
                if len(joined) <= max_chars:
                    current = joined
                    continue
                if current:
                    out.append(current)
                current = piece
            if current:
                out.append(current)
            result: list[str] = []
            for piece in out:
                result.extend(_split_long(piece, max_chars) if len(piece) > max_chars else [piece])
            return result
    return [sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars)]


def split_sentences(text: str, max_chars: int = _DEFAULT_MAX_CHARS) -> list[str]:
    """Split text into sentences (then over-long sentences into clauses, words, or slices of at most
    `max_chars`), so speech can be synthesized and streamed piece by piece. Pieces with nothing to
    say (no letter or digit) are dropped; abbreviations and initials do not end a sentence."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    raw = [p.strip() for p in _SENTENCE_END.split(text)]
    sentences: list[str] = []
    pending = ""
    for piece in raw:
        if not piece:
            continue
        pending = f"{pending} {piece}" if pending else piece
        if _ends_with_abbreviation(pending):
            continue
        sentences.append(pending)
        pending = ""
    if pending:
        sentences.append(pending)
    out: list[str] = []
    for sentence in sentences:
        sentence = " ".join(sentence.split())
        out.extend(p for p in _split_long(sentence, max_chars) if _WORDISH.search(p))
    return out


def _atempo(samples: npt.NDArray[np.float32], factor: float) -> npt.NDArray[np.float32]:
    """Change the tempo by `factor` (0.5-2.0) keeping the pitch (FFmpeg's atempo filter)."""
    import av
    import av.error

    if samples.size == 0 or factor == 1.0:
        return samples
    graph = av.filter.Graph()
    src = graph.add_abuffer(
        format="flt", sample_rate=SAMPLE_RATE, layout="mono", time_base=Fraction(1, SAMPLE_RATE)
    )
    tempo = graph.add("atempo", f"{factor:.6f}")
    sink = graph.add("abuffersink")
    src.link_to(tempo)
    tempo.link_to(sink)
    graph.configure()
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = 0
    frame.time_base = Fraction(1, SAMPLE_RATE)
    graph.push(frame)
    graph.push(None)
    parts: list[npt.NDArray[np.float32]] = []
    while True:
        try:
            out = graph.pull()
        except (av.error.EOFError, av.error.BlockingIOError):
            break
        assert isinstance(out, av.AudioFrame)
        parts.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def resolve_voice(voices: Sequence[str], name: str) -> str:
    """The voice of `voices` (a model's, sorted) that `name` means: the voice itself, or for an OpenAI
    voice name (alloy, echo, ...) the voice ending in `_<name>`, else one of the same gender group
    (cycling), else any. `UnknownVoice` (a 400) for any other name."""
    if name in voices:
        return name
    key = name.strip().lower()
    if key in voices:
        return key
    if key not in OPENAI_VOICES:
        raise UnknownVoice(name, [*voices, *OPENAI_VOICES])
    suffixed = [v for v in voices if v.lower().endswith(f"_{key}")]
    if suffixed:
        return suffixed[0]
    gender = OPENAI_VOICES[key]
    group = [v for v in voices if len(v) > 2 and v[2] == "_" and v[1].lower() == gender]
    names = [n for n, g in OPENAI_VOICES.items() if g == gender]
    if group:
        return group[names.index(key) % len(group)]
    if not voices:
        raise UnknownVoice(name, [])
    return voices[list(OPENAI_VOICES).index(key) % len(voices)]


class KokoroHandle:
    """A loaded Kokoro model: what the cache hands the API."""

    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        kokoro: Any,
        styles: dict[str, npt.NDArray[np.float32]],
        *,
        model_id: str,
        device: str,
        lang: str,
    ) -> None:
        self._kokoro: Any = kokoro
        self._styles = styles
        self.model_id = model_id
        self.device = device
        self.lang = lang
        self.voices: list[str] = sorted(styles)
        self._lock = threading.Lock()

    @property
    def kokoro(self) -> Any:
        """The kokoro_onnx.Kokoro instance (raises `ModelUnloaded` after unload)."""
        kokoro = self._kokoro
        if kokoro is None:
            raise ModelUnloaded(f"model {self.model_id!r} was unloaded")
        return kokoro

    def _release(self) -> Any:
        with self._lock:
            kokoro, self._kokoro = self._kokoro, None
        return kokoro

    def resolve_voice(self, name: str) -> str:
        """The model's voice for `name` (see `resolve_voice`)."""
        return resolve_voice(self.voices, name)

    def synthesize(self, text: str, options: SpeechOptions | None = None) -> npt.NDArray[np.float32]:
        """Speak `text` with `options.voice` (a model voice or an OpenAI name; default "alloy") at
        `options.speed` in `options.lang` (an espeak language such as "en-us"; default: the
        model's). Returns float32 mono at 24 kHz."""
        options = options or SpeechOptions()
        if not text or not _WORDISH.search(text):
            raise InvalidInput("the input text has nothing to say")
        return self._synthesize(text, self.resolve_voice(options.voice or DEFAULT_VOICE), options)

    def _synthesize(self, text: str, resolved: str, options: SpeechOptions) -> npt.NDArray[np.float32]:
        speed, lang = options.speed, options.lang
        style = self._styles[resolved]
        lang = (lang or self.lang).strip().lower()
        model_speed = min(max(float(speed), _MODEL_MIN_SPEED), _MODEL_MAX_SPEED)
        kokoro = self.kokoro
        try:
            samples, _ = kokoro.create(text, voice=style, speed=model_speed, lang=lang)
        except RuntimeError as exc:
            if "not supported by the espeak backend" in str(exc):
                raise UnsupportedLanguage(f"language {lang!r} is not supported: {exc}") from exc
            if is_out_of_memory(exc):
                raise BackendOutOfMemory(f"{self.model_id}: out of memory while synthesizing: {exc}") from exc
            raise
        except ValueError as exc:
            if "phonemes" in str(exc):
                raise InvalidInput(f"nothing to synthesize: {exc}") from exc
            raise
        except MemoryError as exc:
            raise BackendOutOfMemory(f"{self.model_id}: out of memory while synthesizing") from exc
        except Exception as exc:  # onnxruntime's own exception types
            if is_out_of_memory(exc):
                raise BackendOutOfMemory(f"{self.model_id}: out of memory while synthesizing: {exc}") from exc
            raise
        audio = np.asarray(samples, dtype=np.float32).reshape(-1)
        if model_speed != speed:
            audio = _atempo(audio, float(speed) / model_speed)
        return audio

    def iter_synthesize(
        self, text: str, options: SpeechOptions | None = None, *, chunk_chars: int = 0
    ) -> Iterator[npt.NDArray[np.float32]]:
        """The speech of `text` piece by piece, each synthesized when pulled: a generator, so nothing
        runs until the first `next()`, where bad options (`UnknownVoice`, `InvalidInput`) surface
        before any audio. A piece is one sentence (`chunk_chars` 0, for streaming), or as many whole
        sentences as fit in `chunk_chars` characters, spoken by one Kokoro call (kokoro-onnx batches
        within it): a short text is a single piece, a long one stops between pieces when its caller
        does (a client gone)."""
        options = options or SpeechOptions()
        resolved = self.resolve_voice(options.voice or DEFAULT_VOICE)
        pieces = _chunks(split_sentences(text), chunk_chars)
        if not pieces:
            raise InvalidInput("the input text has nothing to say")
        pause = np.zeros(int(SENTENCE_PAUSE_S * self.sample_rate / options.speed), dtype=np.float32)
        for i, piece in enumerate(pieces):
            audio = self._synthesize(piece, resolved, options)
            # the pause Kokoro.create puts between the sentences of one text, so the pieces sound
            # like the same text synthesized whole
            yield np.concatenate([pause, audio]) if i else audio


def _chunks(sentences: list[str], max_chars: int) -> list[str]:
    """Consecutive sentences joined into pieces of at most `max_chars` (a longer sentence alone)."""
    if max_chars <= 0:
        return sentences
    out: list[str] = []
    for sentence in sentences:
        if out and len(out[-1]) + 1 + len(sentence) <= max_chars:
            out[-1] = f"{out[-1]} {sentence}"
        else:
            out.append(sentence)
    return out


def _find_files(path: Path, options: Any) -> tuple[Path, Path]:
    def pick(kind: str, candidates: list[Path], option: str, preferred: tuple[str, ...]) -> Path:
        chosen = options.get(option)
        if chosen:
            # Contained by name, not by resolved path: HF cache snapshots are links into blobs/.
            rel = Path(os.path.normpath(str(chosen)))
            target = path / rel
            if rel.is_absolute() or rel.parts[:1] == ("..",) or not target.is_file():
                raise FileNotFoundError(f"{kind} file {chosen!r} not found in {path}")
            return target
        if len(candidates) == 1:
            return candidates[0]
        for name in preferred:
            for c in candidates:
                if c.name == name:
                    return c
        if not candidates:
            raise FileNotFoundError(f"no {kind} file in {path}")
        names = ", ".join(sorted(str(c.relative_to(path)) for c in candidates))
        raise FileNotFoundError(f"several {kind} files in {path} ({names}); set the model option {option!r}")

    onnx = sorted(path.rglob("*.onnx"))
    voices = sorted(p for p in path.rglob("voices*") if p.suffix in (".npz", ".bin") and p.is_file())
    voice_dir = path / "voices"
    if not voices and not options.get("voices_file") and voice_dir.is_dir() and any(voice_dir.glob("*.bin")):
        # The Hub's ONNX exports (onnx-community/Kokoro-82M-*): one raw float32 file per voice
        return pick("ONNX model", onnx, "onnx_file", ONNX_PREFERRED), voice_dir
    return (
        pick("ONNX model", onnx, "onnx_file", ONNX_PREFERRED),
        pick("voices", voices, "voices_file", ("voices.npz", "voices.bin", "voices-v1.0.bin")),
    )


@functools.lru_cache(maxsize=64)
def _voice_names(voices_path: str, mtime_ns: int) -> tuple[str, ...]:
    """The voice names of a voices archive or directory, read once per version of it (`mtime_ns`):
    speech requests check their voice against them before the model is loaded."""
    path = Path(voices_path)
    if path.is_dir():
        return tuple(sorted(f.stem for f in path.glob("*.bin")))
    with np.load(path) as npz:
        return tuple(sorted(npz.files))


def _read_voices(voices_path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """Style arrays by voice name, from a voices .npz/.bin archive or a directory of per-voice .bin
    files (raw little-endian float32, STYLE_DIM values per token position)."""
    if not voices_path.is_dir():
        with np.load(voices_path) as npz:
            return {name: np.asarray(npz[name], dtype=np.float32) for name in npz.files}
    styles: dict[str, npt.NDArray[np.float32]] = {}
    for file in sorted(voices_path.glob("*.bin")):
        data = np.fromfile(file, dtype="<f4")
        if data.size == 0 or data.size % STYLE_DIM:
            raise ValueError(f"{file.name}: not a Kokoro voice ({data.size} float32 values)")
        styles[file.stem] = data.astype(np.float32).reshape(-1, 1, STYLE_DIM)
    return styles


@contextlib.contextmanager
def _voices_archive(voices_path: Path, styles: dict[str, npt.NDArray[np.float32]]) -> Iterator[Path]:
    """A voices archive kokoro_onnx can open: the file itself, or for a directory of per-voice files a
    temporary .npz of them (removed once loaded: the handle keeps the arrays)."""
    if not voices_path.is_dir():
        yield voices_path
        return
    with tempfile.TemporaryDirectory(prefix="earshot-voices-") as tmp:
        archive = Path(tmp) / "voices.npz"
        np.savez(archive, **styles)  # type: ignore[arg-type]
        yield archive


class KokoroBackend:
    """Loads Kokoro ONNX models. `spec.options` may set `device` (auto|cpu|cuda), `lang` (the default
    espeak language), `onnx_file` and `voices_file` (when the model directory holds several)."""

    def __init__(self, device: str = "auto", default_lang: str = "en-us", cpu_threads: int = 0) -> None:
        self.device = device
        self.default_lang = default_lang
        self.cpu_threads = cpu_threads

    @staticmethod
    def _providers(device: str) -> tuple[str, list[Any]]:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        cuda = "CUDAExecutionProvider" in available
        if device == "auto":
            device = "cuda" if cuda else "cpu"
        if device == "cuda":
            if not cuda:
                raise RuntimeError(
                    "device 'cuda' asked for Kokoro but onnxruntime has no CUDAExecutionProvider "
                    "(install onnxruntime-gpu in place of onnxruntime)"
                )
            return "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device != "cpu":
            raise ValueError(f"unknown device {device!r} for Kokoro; expected auto, cpu or cuda")
        return "cpu", ["CPUExecutionProvider"]

    def fetch(
        self, spec: ModelSpec, *, timeout: float | None = None, cancel: threading.Event | None = None
    ) -> None:
        """Download what `load` needs (a hub model's files, into the HF cache); a no-op for a local
        model. The cache calls it before `load`, under model_download_timeout; `timeout` / `cancel`
        stop a download in progress at its next chunk."""
        download(spec, timeout=timeout, cancel=cancel)

    def load(self, spec: ModelSpec) -> KokoroHandle:
        import onnxruntime as ort
        from kokoro_onnx import Kokoro

        path = Path(local_path(spec))
        if not path.is_dir():
            raise FileNotFoundError(f"model {spec.id!r}: {path} is not a directory")
        onnx_path, voices_path = _find_files(path, spec.options)
        device, providers = self._providers(str(spec.options.get("device", self.device)))
        lang = str(spec.options.get("lang", self.default_lang))
        styles = _read_voices(voices_path)
        if not styles:
            raise ValueError(f"model {spec.id!r}: {voices_path.name} holds no voices")
        opts = ort.SessionOptions()
        threads = int(spec.options.get("cpu_threads", self.cpu_threads))
        if threads > 0:
            opts.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
            with _voices_archive(voices_path, styles) as archive:
                kokoro = Kokoro.from_session(session, str(archive))
        except Exception as exc:
            if is_out_of_memory(exc):
                raise BackendOutOfMemory(f"{spec.id}: out of memory loading on {device}: {exc}") from exc
            raise
        # Kokoro keeps the voices as a lazily read NpzFile (an open file, not thread-safe); the
        # handle passes style arrays instead, so close it and keep plain arrays.
        lazy = kokoro.voices
        kokoro.voices = styles
        close = getattr(lazy, "close", None)
        if callable(close):
            close()
        return KokoroHandle(kokoro, styles, model_id=spec.id, device=device, lang=lang)

    def unload(self, handle: KokoroHandle) -> None:
        kokoro = handle._release()
        if kokoro is None:
            return
        kokoro.sess = None
        del kokoro

    def footprint(self, spec: ModelSpec) -> int:
        return spec_footprint(spec)

    def check(self, spec: ModelSpec, options: SpeechOptions) -> None:
        """What a request asks of the model that its files can answer before it is loaded: the voice.
        `UnknownVoice` for a name the model has no voice for, so a bad request loads nothing (and
        evicts nothing). Nothing is checked while the files are not on this machine."""
        voices = self.voices(spec)
        if voices:
            resolve_voice(voices, options.voice or DEFAULT_VOICE)

    def voices(self, spec: ModelSpec) -> list[str]:
        """The model's voices, named by its voices file (the names in the archive, or the per-voice
        files of a voices/ directory): nothing is loaded or downloaded. [] while the model's files are
        not on this machine (a Hub model not downloaded yet)."""
        path = spec.path if spec.path is not None else cached_snapshot(spec)
        if path is None:
            return []
        try:
            _, voices_path = _find_files(Path(path), spec.options)
            return list(_voice_names(str(voices_path), voices_path.stat().st_mtime_ns))
        except (OSError, ValueError):
            return []
