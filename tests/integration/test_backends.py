"""The real backends on the real demo models (CPU): faster-whisper tiny.en and base, Kokoro int8.

Each model is loaded once per session. Speech the project makes itself (Kokoro) is fed back to
Whisper: a TTS -> STT round trip checks both ends.
"""

from __future__ import annotations

import difflib
import gc
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from earshot.audio.decode import decode_audio
from earshot.audio.encode import encode_audio
from earshot.backends import (
    InvalidInput,
    KokoroBackend,
    KokoroHandle,
    ModelUnloaded,
    Segment,
    UnknownVoice,
    UnsupportedLanguage,
    UnsupportedTask,
    WhisperBackend,
    WhisperHandle,
)
from earshot.backends.kokoro import split_sentences
from earshot.options import InvalidOption, SpeechOptions, TranscribeOptions
from earshot.types import ModelSpec, Task
from tests.conftest import JFK_TEXT, words

pytestmark = pytest.mark.slow

FOX = "Hello world. The quick brown fox jumps over the lazy dog."
JAPANESE = "こんにちは。きょうは いい てんき ですね。"  # kana: espeak-ng's Japanese reads kana, not kanji
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]")


def word_errors(got: str, expected: str) -> int:
    """Words inserted, deleted or substituted between two transcripts."""
    a, b = words(got), words(expected)
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Through the real pipeline: encode as the speech endpoint would, decode as transcription would."""
    return decode_audio(encode_audio(samples, rate, "wav"))


@pytest.fixture(scope="session")
def whisper_backend() -> WhisperBackend:
    return WhisperBackend(device="cpu")


@pytest.fixture(scope="session")
def tiny_spec(models_dir: Path) -> ModelSpec:
    return ModelSpec(
        "faster-whisper-tiny.en", Task.TRANSCRIPTION, "local", path=models_dir / "faster-whisper-tiny.en"
    )


@pytest.fixture(scope="session")
def tiny(whisper_backend: WhisperBackend, tiny_spec: ModelSpec) -> Iterator[WhisperHandle]:
    handle = whisper_backend.load(tiny_spec)
    yield handle
    whisper_backend.unload(handle)


@pytest.fixture(scope="session")
def base(whisper_backend: WhisperBackend, models_dir: Path) -> Iterator[WhisperHandle]:
    spec = ModelSpec(
        "faster-whisper-base", Task.TRANSCRIPTION, "local", path=models_dir / "faster-whisper-base"
    )
    handle = whisper_backend.load(spec)
    yield handle
    whisper_backend.unload(handle)


@pytest.fixture(scope="session")
def kokoro(models_dir: Path) -> Iterator[KokoroHandle]:
    backend = KokoroBackend(device="cpu")
    spec = ModelSpec("kokoro-82m-v1.0-int8", Task.SPEECH, "local", path=models_dir / "kokoro-82m-v1.0-int8")
    handle = backend.load(spec)
    yield handle
    backend.unload(handle)


@pytest.fixture(scope="session")
def jfk(jfk_flac: Path) -> np.ndarray:
    return decode_audio(jfk_flac)


@pytest.fixture(scope="session")
def fox_speech(kokoro: KokoroHandle) -> np.ndarray:
    return kokoro.synthesize(FOX, SpeechOptions(voice="jf_alpha", lang="en-us"))


@pytest.fixture(scope="session")
def japanese_speech(kokoro: KokoroHandle) -> np.ndarray:
    return to_16k(kokoro.synthesize(JAPANESE, SpeechOptions(voice="jf_alpha", lang="ja")), kokoro.sample_rate)


# --------------------------------------------------------------------------- whisper


def test_tiny_en_transcribes_jfk(tiny: WhisperHandle, jfk: np.ndarray) -> None:
    result = tiny.transcribe(jfk)
    assert word_errors(result.text, JFK_TEXT) <= 1, result.text
    assert result.language == "en"
    assert result.duration == pytest.approx(11.0, abs=0.01)
    assert result.segments
    assert result.text == "".join(s.text for s in result.segments).strip()
    assert tiny.multilingual is False
    assert tiny.device == "cpu"


def test_base_transcribes_jfk_and_detects_english(base: WhisperHandle, jfk: np.ndarray) -> None:
    result = base.transcribe(jfk)
    assert word_errors(result.text, JFK_TEXT) <= 1, result.text
    assert result.language == "en"
    assert result.language_probability > 0.5
    assert base.multilingual is True


def test_base_translates_japanese_speech_into_english(
    base: WhisperHandle, japanese_speech: np.ndarray
) -> None:
    heard = base.transcribe(japanese_speech)
    assert heard.language == "ja"
    assert CJK.search(heard.text), f"transcription should be Japanese: {heard.text!r}"
    translated = base.transcribe(japanese_speech, TranscribeOptions(task="translate"))
    assert translated.language == "ja"  # the source language
    assert not CJK.search(translated.text), translated.text
    english = words(translated.text)
    assert len(english) >= 2, translated.text
    assert {"today", "weather", "hello", "good"} & set(english), translated.text


def test_tiny_en_cannot_translate(tiny: WhisperHandle, jfk: np.ndarray) -> None:
    with pytest.raises(UnsupportedTask, match="English-only") as info:
        tiny.transcribe(jfk, TranscribeOptions(task="translate"))
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedLanguage):
        tiny.transcribe(jfk, TranscribeOptions(language="ja"))
    # translation with the multilingual model is fine; unknown languages are not
    with pytest.raises(UnsupportedLanguage):
        tiny.transcribe(jfk, TranscribeOptions(language="xx"))


def test_word_timestamps_are_present_and_ordered(tiny: WhisperHandle, jfk: np.ndarray) -> None:
    result = tiny.transcribe(jfk, TranscribeOptions(word_timestamps=True))
    all_words = [w for s in result.segments for w in (s.words or [])]
    assert all(s.words for s in result.segments)
    assert word_errors(" ".join(w.word for w in all_words), JFK_TEXT) <= 1
    previous_end = 0.0
    for w in all_words:
        assert 0.0 <= w.start <= w.end <= result.duration + 0.01
        assert w.start >= previous_end - 0.01
        assert 0.0 <= w.probability <= 1.0
        previous_end = w.end
    assert all_words[-1].end > 8.0  # spread over the speech, not bunched at the start
    for s in result.segments:
        assert s.start <= s.end
        assert s.words is not None
        assert s.start - 0.01 <= s.words[0].start
        assert s.words[-1].end <= s.end + 0.01
    plain = tiny.transcribe(jfk)
    assert all(s.words is None for s in plain.segments)


def test_stream_matches_transcribe(tiny: WhisperHandle, jfk: np.ndarray) -> None:
    with pytest.raises(UnsupportedTask):  # checked when the stream starts, before any segment
        tiny.stream(jfk, TranscribeOptions(task="translate"))
    segments = list(tiny.stream(jfk))
    assert all(isinstance(s, Segment) for s in segments)
    assert [s.text for s in segments] == [s.text for s in tiny.transcribe(jfk).segments]
    assert [s.id for s in segments] == list(range(1, len(segments) + 1))
    stream = tiny.stream(jfk)
    assert (stream.language, stream.duration) == ("en", pytest.approx(11.0, abs=0.01))
    first = next(stream)
    stream.close()
    assert first.text == segments[0].text


def test_options_reach_the_model(
    tiny: WhisperHandle, jfk: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every option arrives at faster-whisper's own transcribe call, as asked. What the model then
    makes of a prompt (its letter case, say) is the model's whim: only the words are asserted."""
    seen: list[dict[str, object]] = []
    real = tiny.model.transcribe

    def spy(audio: np.ndarray, **kwargs: object) -> object:
        seen.append(kwargs)
        return real(audio, **kwargs)

    monkeypatch.setattr(tiny.model, "transcribe", spy)
    vad = tiny.transcribe(jfk, TranscribeOptions(vad_filter=True))
    assert word_errors(vad.text, JFK_TEXT) <= 1
    assert seen[-1]["vad_filter"] is True
    greedy = tiny.transcribe(jfk, TranscribeOptions(temperature=0.3), beam_size=1)
    assert all(s.temperature == pytest.approx(0.3) for s in greedy.segments)
    assert (seen[-1]["temperature"], seen[-1]["beam_size"]) == ([0.3], 1)
    prompt = "AND SO MY FELLOW AMERICANS. ASK NOT."
    prompted = tiny.transcribe(jfk, TranscribeOptions(prompt=prompt))
    assert seen[-1]["initial_prompt"] == prompt
    assert word_errors(prompted.text, JFK_TEXT) <= 1
    hot = tiny.transcribe(jfk, TranscribeOptions(hotwords="Americans", language="EN "))
    assert (seen[-1]["hotwords"], seen[-1]["language"]) == ("Americans", "en")
    assert "americans" in words(hot.text)
    assert seen[0]["temperature"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # 0: the fallback schedule
    with pytest.raises(InvalidOption, match="temperature"):
        TranscribeOptions(temperature=1.5)
    with pytest.raises(InvalidInput):
        tiny.transcribe(np.zeros(0, np.float32))


def test_unload_releases_the_model(
    whisper_backend: WhisperBackend, tiny_spec: ModelSpec, jfk: np.ndarray
) -> None:
    handle = whisper_backend.load(tiny_spec)
    assert handle.transcribe(jfk[:32000]).text
    ct2_model = handle.model.model  # the CTranslate2 model holding the weights (on the GPU with cuda)
    assert ct2_model.model_is_loaded
    whisper_backend.unload(handle)
    assert not ct2_model.model_is_loaded  # weights freed now, not whenever the GC gets to it
    with pytest.raises(ModelUnloaded):
        handle.transcribe(jfk)
    whisper_backend.unload(handle)  # twice is harmless
    gc.collect()


def test_footprint_is_the_model_files(whisper_backend: WhisperBackend, tiny_spec: ModelSpec) -> None:
    assert tiny_spec.path is not None
    expected = sum(p.stat().st_size for p in tiny_spec.path.iterdir() if p.is_file())
    assert whisper_backend.footprint(tiny_spec) == expected
    assert expected > 70 * 2**20


# --------------------------------------------------------------------------- kokoro


def test_kokoro_round_trip_through_tiny_en(
    kokoro: KokoroHandle, tiny: WhisperHandle, fox_speech: np.ndarray
) -> None:
    assert fox_speech.dtype == np.float32
    assert fox_speech.ndim == 1
    assert kokoro.sample_rate == 24000
    assert 2.0 < len(fox_speech) / 24000 < 8.0
    heard = tiny.transcribe(to_16k(fox_speech, kokoro.sample_rate))
    assert words(heard.text) == words(FOX), heard.text


def test_kokoro_voices_and_openai_names(kokoro: KokoroHandle) -> None:
    assert kokoro.voices == ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]
    assert kokoro.resolve_voice("alloy").startswith("jf_")
    assert kokoro.resolve_voice("echo") == "jm_kumo"
    with pytest.raises(UnknownVoice, match="jf_alpha"):
        kokoro.synthesize("Hello.", SpeechOptions(voice="nonexistent"))


def test_an_openai_voice_name_speaks_with_the_mapped_voice(kokoro: KokoroHandle) -> None:
    by_name = kokoro.synthesize("Hi there.", SpeechOptions(voice="echo"))
    mapped = kokoro.synthesize("Hi there.", SpeechOptions(voice="jm_kumo"))
    np.testing.assert_array_equal(by_name, mapped)
    other = kokoro.synthesize("Hi there.", SpeechOptions(voice="jf_alpha"))
    n = min(len(other), len(mapped))
    assert not np.allclose(other[:n], mapped[:n], atol=1e-3)


def test_kokoro_speed(kokoro: KokoroHandle) -> None:
    text = "The quick brown fox."
    normal = len(kokoro.synthesize(text, SpeechOptions(voice="jf_alpha"))) / 24000
    # within the model's own range (0.5-2.0) and beyond it (time-stretched after synthesis)
    for speed in (2.0, 4.0, 0.25):
        seconds = len(kokoro.synthesize(text, SpeechOptions(voice="jf_alpha", speed=speed))) / 24000
        assert seconds == pytest.approx(normal / speed, rel=0.2), speed
    for bad in (0.1, 4.5, math.nan):
        with pytest.raises(InvalidOption, match="speed"):
            SpeechOptions(voice="jf_alpha", speed=bad)


def test_kokoro_input_and_language_errors(kokoro: KokoroHandle) -> None:
    with pytest.raises(InvalidInput):
        kokoro.synthesize("  ...  ", SpeechOptions(voice="jf_alpha"))
    with pytest.raises(UnsupportedLanguage):
        kokoro.synthesize("Hello.", SpeechOptions(voice="jf_alpha", lang="xx-nope"))


def test_kokoro_sentence_by_sentence(kokoro: KokoroHandle, fox_speech: np.ndarray) -> None:
    assert split_sentences(FOX) == ["Hello world.", "The quick brown fox jumps over the lazy dog."]
    pieces = list(kokoro.iter_synthesize(FOX, SpeechOptions(voice="jf_alpha")))
    assert len(pieces) == 2
    assert all(p.dtype == np.float32 for p in pieces)
    assert len(pieces[0]) < len(pieces[1])  # "Hello world." is the shorter sentence
    assert sum(len(p) for p in pieces) == pytest.approx(len(fox_speech), rel=0.25)
    gen = kokoro.iter_synthesize(FOX, SpeechOptions(voice="nobody"))  # the error comes at the first pull
    with pytest.raises(UnknownVoice):
        next(gen)


def test_kokoro_unload(models_dir: Path) -> None:
    backend = KokoroBackend(device="cpu")
    spec = ModelSpec("k", Task.SPEECH, "local", path=models_dir / "kokoro-82m-v1.0-int8")
    handle = backend.load(spec)
    assert handle.device == "cpu"
    assert handle.lang == "en-us"
    backend.unload(handle)
    with pytest.raises(ModelUnloaded):
        handle.synthesize("Hello.", SpeechOptions(voice="jf_alpha"))
    ja = backend.load(ModelSpec("k", Task.SPEECH, "local", path=spec.path, options={"lang": "ja"}))
    assert ja.lang == "ja"
    backend.unload(ja)


def test_one_handle_serves_concurrent_requests(
    tiny: WhisperHandle, kokoro: KokoroHandle, jfk: np.ndarray
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        texts = [f.result().text for f in [pool.submit(tiny.transcribe, jfk) for _ in range(2)]]
        voices = [
            f.result()
            for f in [
                pool.submit(kokoro.synthesize, "Hi there.", SpeechOptions(voice=v)) for v in ("echo", "echo")
            ]
        ]
    assert texts[0] == texts[1]
    assert word_errors(texts[0], JFK_TEXT) <= 1
    np.testing.assert_array_equal(voices[0], voices[1])
