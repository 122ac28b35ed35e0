"""The model-free parts of the backends: sentence splitting, voice mapping, OOM detection, footprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from earshot.backends import (
    Backend,
    BackendOutOfMemory,
    KokoroBackend,
    KokoroHandle,
    UnknownVoice,
    WhisperBackend,
    WhisperHandle,
    default_backends,
)
from earshot.backends._common import is_out_of_memory
from earshot.backends.kokoro import split_sentences
from earshot.cache.protocol import ModelSpec, Task

# Kokoro v1.0's English voices (a subset): OpenAI names map to the voice that carries them
V10_VOICES = [
    "af_alloy",
    "af_bella",
    "af_heart",
    "af_nova",
    "am_adam",
    "am_echo",
    "am_michael",
    "am_onyx",
    "bf_emma",
    "bm_fable",
    "bm_george",
]
DEMO_VOICES = ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]


def _handle(voices: list[str]) -> KokoroHandle:
    styles = {v: np.zeros((510, 1, 256), np.float32) for v in voices}
    return KokoroHandle(None, styles, model_id="test", device="cpu", lang="en-us")


# --------------------------------------------------------------------------- voices


def test_openai_names_map_to_the_voice_of_that_name() -> None:
    handle = _handle(V10_VOICES)
    assert handle.resolve_voice("alloy") == "af_alloy"
    assert handle.resolve_voice("echo") == "am_echo"
    assert handle.resolve_voice("fable") == "bm_fable"
    assert handle.resolve_voice("onyx") == "am_onyx"
    assert handle.resolve_voice("nova") == "af_nova"
    # no *_shimmer voice: a female voice
    assert handle.resolve_voice("shimmer")[1] == "f"


def test_openai_names_map_by_gender_on_the_demo_voices() -> None:
    handle = _handle(DEMO_VOICES)
    female = [handle.resolve_voice(n) for n in ("alloy", "nova", "shimmer")]
    assert all(v.startswith("jf_") for v in female)
    assert len(set(female)) == 3  # cycles through the group instead of collapsing onto one voice
    assert female[0] == "jf_alpha"
    for name in ("echo", "fable", "onyx"):
        assert handle.resolve_voice(name) == "jm_kumo"
    # deterministic
    assert [handle.resolve_voice(n) for n in ("alloy", "nova", "shimmer")] == female


def test_exact_voice_names_win_and_case_is_forgiven() -> None:
    handle = _handle(DEMO_VOICES)
    assert handle.resolve_voice("jf_nezumi") == "jf_nezumi"
    assert handle.resolve_voice("Alloy") == "jf_alpha"
    assert handle.voices == DEMO_VOICES


def test_no_voice_of_the_gender_falls_back_to_any_voice() -> None:
    handle = _handle(["jf_alpha", "jf_nezumi"])
    assert handle.resolve_voice("onyx") in ("jf_alpha", "jf_nezumi")


def test_unknown_voice_lists_the_available_ones() -> None:
    handle = _handle(DEMO_VOICES)
    with pytest.raises(UnknownVoice) as info:
        handle.resolve_voice("darth_vader")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "darth_vader" in message
    for voice in DEMO_VOICES:
        assert voice in message


# --------------------------------------------------------------------------- sentences


def test_split_sentences_at_sentence_ends() -> None:
    text = "Hello world. The quick brown fox jumps over the lazy dog! Is it? Yes…  It is."
    assert split_sentences(text) == [
        "Hello world.",
        "The quick brown fox jumps over the lazy dog!",
        "Is it?",
        "Yes…",
        "It is.",
    ]


def test_split_sentences_keeps_abbreviations_initials_and_decimals() -> None:
    text = "Mr. Smith paid $3.50 to Dr. Jones, e.g. for J. R. R. Tolkien's book. Then he left."
    assert split_sentences(text) == [
        "Mr. Smith paid $3.50 to Dr. Jones, e.g. for J. R. R. Tolkien's book.",
        "Then he left.",
    ]


def test_split_sentences_cjk_and_paragraphs() -> None:
    assert split_sentences("こんにちは。きょうは いい てんき ですね。") == [
        "こんにちは。",
        "きょうは いい てんき ですね。",
    ]
    assert split_sentences("A title\n\nThe body text") == ["A title", "The body text"]


def test_split_sentences_splits_long_sentences_at_clauses_then_words() -> None:
    clause = "the fox ran over the hill and far away"
    text = ", ".join([clause] * 20) + "."
    pieces = split_sentences(text, max_chars=100)
    assert all(len(p) <= 100 for p in pieces)
    assert len(pieces) > 5
    assert all(p.endswith((",", ".")) for p in pieces)  # cut at the commas
    assert " ".join(pieces) == text
    words = "word " * 300
    pieces = split_sentences(words, max_chars=50)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces).split() == words.split()
    blob = "x" * 230
    assert split_sentences(blob, max_chars=100) == ["x" * 100, "x" * 100, "x" * 30]


def test_split_sentences_drops_pieces_with_nothing_to_say() -> None:
    assert split_sentences("Hello. ... !!! Bye.") == ["Hello.", "Bye."]
    assert split_sentences("  ") == []


# --------------------------------------------------------------------------- errors, footprint


@pytest.mark.parametrize(
    "message",
    [
        "CUDA failed with error out of memory",
        "CUDA_ERROR_OUT_OF_MEMORY",
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer",
        "std::bad_alloc",
    ],
)
def test_out_of_memory_messages_are_recognized(message: str) -> None:
    assert is_out_of_memory(RuntimeError(message))


def test_other_errors_are_not_out_of_memory() -> None:
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("Unable to open file 'model.bin'"))
    assert not is_out_of_memory(ValueError("bad"))
    assert issubclass(BackendOutOfMemory, Exception)


def test_footprint_sums_the_model_files(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_bytes(b"y" * 24)
    spec = ModelSpec("m", Task.TRANSCRIPTION, "local", path=tmp_path)
    assert WhisperBackend().footprint(spec) == 1024
    assert KokoroBackend().footprint(spec) == 1024
    remote = ModelSpec("r", Task.SPEECH, "hf", repo_id="org/none", size_bytes=5000)
    assert KokoroBackend().footprint(remote) == 5000
    assert WhisperBackend().footprint(ModelSpec("r", Task.SPEECH, "hf", repo_id="org/none")) == 0


def test_default_backends_by_task() -> None:
    backends = default_backends("cpu", "int8")
    assert set(backends) == {Task.TRANSCRIPTION.value, Task.SPEECH.value}
    assert isinstance(backends["transcription"], WhisperBackend)
    assert isinstance(backends["speech"], KokoroBackend)
    assert all(isinstance(b, Backend) for b in backends.values())
    whisper = backends["transcription"]
    assert isinstance(whisper, WhisperBackend)
    assert (whisper.device, whisper.compute_type) == ("cpu", "int8")


def test_a_missing_model_dir_fails_without_trying_a_download(tmp_path: Path) -> None:
    spec = ModelSpec("tiny", Task.TRANSCRIPTION, "local", path=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no CTranslate2 model\.bin"):
        WhisperBackend(device="cpu").load(spec)
    with pytest.raises(FileNotFoundError):
        KokoroBackend(device="cpu").load(ModelSpec("k", Task.SPEECH, "local", path=tmp_path / "nope"))


class BusyCT2Model:
    """CTranslate2's Whisper as `unload_model` sees it: it returns without unloading while its pool
    still counts a batch as active (here: the first `busy_calls` calls)."""

    compute_type = "int8_float32"
    is_multilingual = False

    def __init__(self, busy_calls: int) -> None:
        self.busy_calls = busy_calls
        self.calls = 0
        self.model_is_loaded = True

    def unload_model(self) -> None:
        self.calls += 1
        if self.calls > self.busy_calls:
            self.model_is_loaded = False


class FakeWhisperModel:
    supported_languages = ("en",)

    def __init__(self, inner: BusyCT2Model) -> None:
        self.model = inner


@pytest.mark.parametrize("busy_calls", [0, 3])
def test_whisper_unload_retries_while_ctranslate2_reports_a_batch_in_flight(busy_calls: int) -> None:
    inner = BusyCT2Model(busy_calls)
    handle = WhisperHandle(FakeWhisperModel(inner), model_id="m", device="cpu", compute_type="auto")
    WhisperBackend(device="cpu").unload(handle)
    assert not inner.model_is_loaded
    assert inner.calls == busy_calls + 1


def test_whisper_unload_gives_up_on_a_model_that_stays_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    import earshot.backends.whisper as whisper_module

    monkeypatch.setattr(whisper_module, "_UNLOAD_RETRY_S", 0.05)
    inner = BusyCT2Model(busy_calls=10**9)
    handle = WhisperHandle(FakeWhisperModel(inner), model_id="m", device="cpu", compute_type="auto")
    WhisperBackend(device="cpu").unload(handle)  # returns: the references are dropped anyway
    assert inner.model_is_loaded
    assert inner.calls > 1


def test_speech_chunks_join_whole_sentences_up_to_the_limit() -> None:
    from earshot.backends.kokoro import _chunks

    sentences = ["One.", "Two two.", "Three three three.", "x" * 50]
    assert _chunks(sentences, 0) == sentences  # streaming: a sentence each
    assert _chunks(sentences, 1000) == [" ".join(sentences)]  # a short text: one Kokoro call
    assert _chunks(sentences, 20) == ["One. Two two.", "Three three three.", "x" * 50]
