"""The HTTP API driven by the official `openai` SDK against the real server and the demo models."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import av
import httpx
import openai
import pytest

from tests.conftest import JFK_TEXT, words
from tests.support.server import Server

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"
PANGRAM = "Hello world. The quick brown fox jumps over the lazy dog."
SRT_TIME = re.compile(r"^\d{2}:\d{2}:\d{2},\d{3} --> \d{2}:\d{2}:\d{2},\d{3}$")
VTT_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}$")


def close_enough(got: str, want: str, max_diff: int = 1) -> bool:
    a, b = words(got), words(want)
    import difflib

    ops = difflib.SequenceMatcher(a=a, b=b).get_opcodes()
    diff = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
    return diff <= max_diff


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def jfk_bytes(jfk_flac: Path) -> bytes:
    return jfk_flac.read_bytes()


def decode(data: bytes) -> tuple[float, int, int]:
    """(duration seconds, sample rate, channels) of encoded audio, decoded with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = 0
        rate = stream.codec_context.sample_rate
        channels = stream.codec_context.channels
        for frame in container.decode(stream):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate, rate, channels


def test_transcription_json(client: openai.OpenAI, jfk_bytes: bytes) -> None:
    result = client.audio.transcriptions.create(model=TINY, file=("jfk.flac", jfk_bytes))
    assert close_enough(result.text, JFK_TEXT)


def test_transcription_text(client: openai.OpenAI, jfk_bytes: bytes) -> None:
    result = client.audio.transcriptions.create(
        model=TINY, file=("jfk.flac", jfk_bytes), response_format="text"
    )
    assert isinstance(result, str)
    assert close_enough(result, JFK_TEXT)


def test_transcription_srt(client: openai.OpenAI, jfk_bytes: bytes) -> None:
    result = client.audio.transcriptions.create(
        model=TINY, file=("jfk.flac", jfk_bytes), response_format="srt"
    )
    blocks = [b.splitlines() for b in str(result).strip().split("\n\n")]
    assert len(blocks) >= 1
    for number, block in enumerate(blocks, start=1):
        assert block[0] == str(number)
        assert SRT_TIME.match(block[1]), block[1]
    assert close_enough(" ".join(" ".join(b[2:]) for b in blocks), JFK_TEXT)
    last_end = blocks[-1][1].split(" --> ")[1]
    assert last_end.startswith("00:00:1")  # the speech ends about 11 s in


def test_transcription_vtt(client: openai.OpenAI, jfk_bytes: bytes) -> None:
    result = str(
        client.audio.transcriptions.create(model=TINY, file=("jfk.flac", jfk_bytes), response_format="vtt")
    )
    assert result.startswith("WEBVTT\n\n")
    blocks = [b.splitlines() for b in result[len("WEBVTT\n\n") :].strip().split("\n\n")]
    for block in blocks:
        assert VTT_TIME.match(block[0]), block[0]
    assert close_enough(" ".join(" ".join(b[1:]) for b in blocks), JFK_TEXT)


def test_transcription_verbose_json_with_words(client: openai.OpenAI, jfk_bytes: bytes) -> None:
    result = client.audio.transcriptions.create(
        model=TINY,
        file=("jfk.flac", jfk_bytes),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert close_enough(result.text, JFK_TEXT)
    assert result.language == "en"
    assert 10.5 < result.duration < 11.5
    assert result.segments
    assert all(s.start < s.end for s in result.segments)
    assert result.segments[-1].end <= result.duration + 0.5
    assert result.words
    assert [w.start for w in result.words] == sorted(w.start for w in result.words)
    assert close_enough(" ".join(w.word for w in result.words), JFK_TEXT)
    assert words(result.words[-1].word) == ["country"]


def test_transcription_with_base_and_extra_fields(client: openai.OpenAI, jfk_bytes: bytes) -> None:
    result = client.audio.transcriptions.create(
        model=BASE,
        file=("jfk.flac", jfk_bytes),
        language="en",
        extra_body={"vad_filter": "true", "hotwords": "Americans"},
    )
    assert close_enough(result.text, JFK_TEXT)


def test_translation_with_base(client: openai.OpenAI) -> None:
    # Spanish speech made by Kokoro (espeak's Spanish phonemes), translated into English by base.
    audio = client.audio.speech.create(
        model=KOKORO,
        voice="jm_kumo",
        input="Buenos días. Hoy hace muy buen tiempo y quiero ir a la playa con mi familia.",
        response_format="wav",
        extra_body={"lang": "es"},
    ).content
    result = client.audio.translations.create(
        model=BASE, file=("es.wav", audio), response_format="verbose_json"
    )
    assert result.language == "es"  # detected: the input was Spanish
    said = set(words(result.text))
    assert len({"good", "morning", "beach", "family"} & said) >= 3, result.text
    assert not {"playa", "familia", "buenos"} & said, result.text  # English, not a transcript


@pytest.mark.parametrize(
    ("fmt", "rate"),
    [("mp3", 24000), ("opus", 48000), ("aac", 24000), ("flac", 24000), ("wav", 24000)],
)
def test_speech_formats(client: openai.OpenAI, fmt: str, rate: int) -> None:
    data = client.audio.speech.create(model=KOKORO, voice="alloy", input=PANGRAM, response_format=fmt).content  # type: ignore[arg-type]
    duration, sample_rate, channels = decode(data)
    assert sample_rate == rate
    assert channels == 1
    assert 2.0 < duration < 8.0


def test_speech_pcm_is_24khz_16bit_mono(client: openai.OpenAI) -> None:
    wav = client.audio.speech.create(
        model=KOKORO, voice="alloy", input=PANGRAM, response_format="wav"
    ).content
    pcm = client.audio.speech.create(
        model=KOKORO, voice="alloy", input=PANGRAM, response_format="pcm"
    ).content
    assert len(pcm) % 2 == 0
    wav_seconds, _, _ = decode(wav)
    assert abs(len(pcm) / 2 / 24000 - wav_seconds) < 0.05
    assert pcm == wav[-len(pcm) :]  # the same samples as the WAV's data chunk


def test_speech_round_trip_through_tiny(client: openai.OpenAI) -> None:
    wav = client.audio.speech.create(
        model="tts-1", voice="alloy", input=PANGRAM, response_format="wav"
    ).content
    text = client.audio.transcriptions.create(model=TINY, file=("speech.wav", wav)).text
    assert words(text) == words(PANGRAM)


def test_speech_speed_changes_duration(client: openai.OpenAI) -> None:
    normal = decode(
        client.audio.speech.create(model=KOKORO, voice="alloy", input=PANGRAM, response_format="wav").content
    )
    fast = decode(
        client.audio.speech.create(
            model=KOKORO, voice="alloy", input=PANGRAM, response_format="wav", speed=2.0
        ).content
    )
    assert fast[0] < normal[0] * 0.7


def test_models_list(client: openai.OpenAI) -> None:
    ids = {m.id: m for m in client.models.list()}
    assert {TINY, BASE, KOKORO} <= set(ids)
    assert ids[KOKORO].model_extra["task"] == "speech"  # type: ignore[index]
    assert ids[TINY].model_extra["task"] == "transcription"  # type: ignore[index]
    assert isinstance(ids[TINY].model_extra["loaded"], bool)  # type: ignore[index]
    assert client.models.retrieve(TINY).id == TINY


def test_models_loaded_flag_follows_the_cache(
    server: Server, client: openai.OpenAI, jfk_bytes: bytes
) -> None:
    with server.client() as http:
        http.delete(f"/v1/models/{TINY}")
        assert {m["id"]: m["loaded"] for m in http.get("/v1/models").json()["data"]}[TINY] is False
        client.audio.transcriptions.create(model=TINY, file=("jfk.flac", jfk_bytes))
        assert {m["id"]: m["loaded"] for m in http.get("/v1/models").json()["data"]}[TINY] is True


def test_streaming_transcription_events_in_order(server: Server, jfk_bytes: bytes) -> None:
    events = []
    with (
        server.client() as http,
        http.stream(
            "POST",
            "/v1/audio/transcriptions",
            files={"file": ("jfk.flac", jfk_bytes)},
            data={"model": TINY, "stream": "true"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        import json

        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    deltas = [e for e in events if e["type"] == "transcript.text.delta"]
    assert len(deltas) >= 1
    assert events[-1]["type"] == "transcript.text.done"
    assert all(e["type"] == "transcript.text.delta" for e in events[:-1])
    starts = [e["segment"]["start"] for e in deltas]
    assert starts == sorted(starts)
    assert [e["segment"]["id"] for e in deltas] == sorted(e["segment"]["id"] for e in deltas)
    assert close_enough(events[-1]["text"], JFK_TEXT)
    assert words(events[-1]["text"]) == words(" ".join(e["delta"] for e in deltas))


def test_streaming_transcription_with_the_sdk(client: openai.OpenAI, jfk_bytes: bytes) -> None:
    stream = client.audio.transcriptions.create(model=TINY, file=("jfk.flac", jfk_bytes), stream=True)
    events = list(stream)
    assert events[-1].type == "transcript.text.done"
    assert close_enough(events[-1].text, JFK_TEXT)  # type: ignore[union-attr]


FIVE_SENTENCES = (
    "The first light came over the hills. Birds began to sing in the old oak tree. "
    "A farmer walked slowly to the barn. His dog ran ahead, barking at the geese. "
    "By noon the whole valley was warm and bright."
)


def test_streaming_speech_first_bytes_before_full_synthesis(server: Server) -> None:
    body = {"model": KOKORO, "voice": "alloy", "input": FIVE_SENTENCES, "response_format": "pcm"}
    with server.client() as http:
        http.post("/v1/models/" + KOKORO)  # warm: measure synthesis, not the load
        start = time.perf_counter()
        full = http.post("/v1/audio/speech", json=body)
        full_seconds = time.perf_counter() - start
        assert full.status_code == 200

        chunks: list[tuple[float, int]] = []
        start = time.perf_counter()
        with http.stream("POST", "/v1/audio/speech", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                if chunk:
                    chunks.append((time.perf_counter() - start, len(chunk)))
    first_byte = chunks[0][0]
    assert len(chunks) >= 3  # sentence by sentence, not one blob
    assert first_byte < full_seconds / 2, (first_byte, full_seconds)
    streamed = sum(n for _, n in chunks)
    # the same speech: sentence by sentence (with Kokoro's sentence pause between pieces) comes out
    # within 10% of the length of the text synthesized whole
    assert abs(streamed - len(full.content)) < 0.1 * len(full.content), (streamed, len(full.content))


def test_streaming_speech_mp3_decodes(server: Server) -> None:
    body = {
        "model": KOKORO,
        "voice": "alloy",
        "input": FIVE_SENTENCES,
        "response_format": "mp3",
        "stream": True,
    }
    with server.client() as http:
        data = http.post("/v1/audio/speech", json=body).content
    duration, rate, _ = decode(data)
    assert rate == 24000
    assert duration > 8


def test_voices(server: Server) -> None:
    with server.client() as http:
        voices = http.get("/v1/audio/voices", params={"model": KOKORO}).json()["data"]
    assert {v["voice"] for v in voices} == {
        "jf_alpha",
        "jf_gongitsune",
        "jf_nezumi",
        "jf_tebukuro",
        "jm_kumo",
    }


def test_health_answers_during_a_long_transcription(server: Server, jfk_bytes: bytes) -> None:
    import threading

    long_audio = jfk_bytes
    done = threading.Event()
    latencies: list[float] = []

    def transcribe() -> None:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            http.post(
                "/v1/audio/transcriptions", files={"file": ("a.flac", long_audio)}, data={"model": BASE}
            )
        done.set()

    worker = threading.Thread(target=transcribe)
    worker.start()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        time.sleep(0.5)
        while not done.is_set():
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
    worker.join()
    assert len(latencies) >= 5
    assert sorted(latencies)[len(latencies) // 2] < 0.1  # median well under 100 ms while base runs
    assert httpx  # keep import used
