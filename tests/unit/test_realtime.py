"""Realtime building blocks without a server: the turn logic on given probabilities, Silero VAD and
the decoders on real audio (jfk.flac), the input buffer, session configuration and event parsing,
and the realtime metrics fed with session events."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from earshot.observability.events import EventLog
from earshot.observability.realtime import realtime_observers
from earshot.realtime.audio import PCM16, PCMA, PCMU, AudioDecoder
from earshot.realtime.buffer import AudioBuffer
from earshot.realtime.config import SessionConfig, apply_update
from earshot.realtime.events import ClientEventError, parse_client_event, parse_session
from earshot.realtime.vad import FRAME, SileroVad, SpeechStart, SpeechStop, TurnDetector, VadSettings
from earshot.session_events import (
    AudioReceived,
    SessionEnd,
    SessionEnded,
    SessionModelChanged,
    SessionRefused,
    SessionStarted,
    TurnCompleted,
)
from earshot.types import ModelSpec, Task
from tests.support.audio import pcm16

MS = 16  # samples per millisecond at 16 kHz


def frames(*runs: tuple[float, int]) -> np.ndarray:
    """Per-frame probabilities: (probability, number of 32 ms frames), ..."""
    return np.concatenate([np.full(n, p, np.float32) for p, n in runs])


# ---------------------------------------------------------------------- turn logic


def test_speech_starts_with_prefix_padding_and_stops_after_the_silence() -> None:
    detector = TurnDetector(VadSettings(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500))
    events = detector.feed(frames((0.1, 20), (0.9, 30), (0.1, 20)))
    start, stop = events
    assert isinstance(start, SpeechStart)
    assert start.detected_at == 20 * FRAME
    assert start.at == 20 * FRAME - 300 * MS
    assert isinstance(stop, SpeechStop)
    # 500 ms of silence = 16 frames (rounded up): speech ends with the 16th silent frame.
    assert stop.at == (50 + 16) * FRAME


def test_a_pause_shorter_than_silence_duration_keeps_the_turn() -> None:
    detector = TurnDetector(VadSettings(silence_duration_ms=500))
    events = detector.feed(frames((0.9, 10), (0.1, 10), (0.9, 10), (0.1, 20)))
    assert [type(e) for e in events] == [SpeechStart, SpeechStop]


def test_between_the_thresholds_speech_goes_on() -> None:
    # threshold 0.5, silence below 0.35: 0.4 neither starts speech nor ends it.
    detector = TurnDetector(VadSettings(threshold=0.5, silence_duration_ms=100))
    assert detector.feed(frames((0.4, 20))) == []
    events = detector.feed(frames((0.9, 2), (0.4, 40)))
    assert [type(e) for e in events] == [SpeechStart]
    assert detector.speaking


def test_the_next_turn_never_begins_before_the_last_one_ended() -> None:
    detector = TurnDetector(VadSettings(prefix_padding_ms=1000, silence_duration_ms=100))
    events = detector.feed(frames((0.9, 5), (0.1, 4), (0.9, 5)))
    first_stop, second_start = events[1], events[2]
    assert isinstance(first_stop, SpeechStop)
    assert isinstance(second_start, SpeechStart)
    assert second_start.at == first_stop.at  # not 1000 ms before the speech


def test_threshold_is_the_sessions() -> None:
    quiet = frames((0.1, 5), (0.6, 10))
    assert TurnDetector(VadSettings(threshold=0.5)).feed(quiet)
    assert TurnDetector(VadSettings(threshold=0.7)).feed(quiet) == []


# ---------------------------------------------------------------------- Silero on real audio


@pytest.fixture(scope="module")
def jfk16(jfk_flac: Path) -> np.ndarray:
    return np.frombuffer(pcm16(jfk_flac), "<i2").astype(np.float32) / 32768


def test_silero_finds_the_speech_of_jfk(jfk16: np.ndarray) -> None:
    stream = SileroVad.load().stream()
    silence = np.zeros(16000, np.float32)
    probs = np.concatenate([stream.feed(c) for c in np.array_split(np.concatenate([silence, jfk16]), 97)])
    assert len(probs) == (len(jfk16) + 16000) // FRAME
    assert probs[: 16000 // FRAME].max() < 0.5  # the second of silence before it
    assert (probs > 0.5).mean() > 0.5  # JFK speaks most of the 11 s
    detector = TurnDetector(VadSettings())
    events = detector.feed(probs)
    starts = [e for e in events if isinstance(e, SpeechStart)]
    assert starts
    assert starts[0].detected_at >= 16000  # not in the silence


def test_vad_in_chunks_equals_vad_at_once(jfk16: np.ndarray) -> None:
    whole = SileroVad.load().stream().feed(jfk16)
    stream = SileroVad.load().stream()
    pieces = np.concatenate([stream.feed(c) for c in np.array_split(jfk16, 333)])  # odd sizes
    np.testing.assert_allclose(pieces, whole, atol=1e-4)


# ---------------------------------------------------------------------- decoding


def _encode(codec: str, samples: np.ndarray) -> bytes:
    ctx = av.CodecContext.create(codec, "w")
    ctx.sample_rate, ctx.layout, ctx.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 8000
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


@pytest.mark.parametrize(("fmt", "codec"), [(PCMU, "pcm_mulaw"), (PCMA, "pcm_alaw")])
def test_g711_decodes_to_16_khz(fmt: object, codec: str) -> None:
    tone = (np.sin(2 * np.pi * 440 * np.arange(8000) / 8000) * 12000).astype("<i2")
    data = _encode(codec, tone)
    assert len(data) == 8000
    decoder = AudioDecoder(fmt)  # type: ignore[arg-type]
    out = np.concatenate([decoder.decode(data[i : i + 160]) for i in range(0, len(data), 160)])
    assert abs(len(out) - 16000) < 64
    assert 0.3 < np.abs(out[1000:15000]).max() < 0.45  # 12000/32768, through the companding
    spectrum = np.abs(np.fft.rfft(out[:15000]))
    assert abs(np.argmax(spectrum) * 16000 / 15000 - 440) < 5


def test_pcm16_24k_chunks_of_odd_sizes(jfk_flac: Path) -> None:
    data = pcm16(jfk_flac, rate=24000)
    decoder = AudioDecoder(PCM16)
    out = np.concatenate([decoder.decode(data[i : i + 4801]) for i in range(0, len(data), 4801)])
    assert abs(len(out) - len(data) / 2 / 1.5) < 64


# ---------------------------------------------------------------------- buffer


def test_buffer_takes_ranges_across_chunks_and_drops_what_is_done() -> None:
    buf = AudioBuffer()
    for i in range(10):
        buf.append(np.full(100, i, np.float32))
    np.testing.assert_array_equal(buf.take(250, 420), np.repeat([2, 3, 4], [50, 100, 20]).astype(np.float32))
    buf.drop_before(450)
    assert buf.start == 400
    assert len(buf.take(0, 1000)) == 600
    buf.clear()
    assert len(buf) == 0
    assert buf.start == buf.end == 1000


# ---------------------------------------------------------------------- config and events


def resolve(name: str) -> ModelSpec | None:
    specs = {
        "faster-whisper-tiny.en": ModelSpec("faster-whisper-tiny.en", Task.TRANSCRIPTION, "local"),
        "kokoro": ModelSpec("kokoro", Task.SPEECH, "local"),
    }
    return specs.get({"whisper-1": "faster-whisper-tiny.en"}.get(name, name))


def update(session: dict[str, object]) -> object:
    return parse_session(parse_client_event(json.dumps({"type": "session.update", "session": session})))


def test_session_update_sets_only_what_it_names() -> None:
    config = SessionConfig(model="faster-whisper-tiny.en")
    new = apply_update(
        config,
        update(
            {
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcmu"},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 900},
                        "transcription": {"model": "whisper-1", "language": "EN"},
                    }
                },
            }
        ),  # type: ignore[arg-type]
        resolve,
    )
    assert new.format is PCMU
    assert new.vad == VadSettings(silence_duration_ms=900)
    assert new.language == "en"
    off = apply_update(
        new, update({"type": "transcription", "audio": {"input": {"turn_detection": None}}}), resolve
    )  # type: ignore[arg-type]
    assert off.vad is None
    assert off.format is PCMU  # untouched
    shown = off.describe().model_dump(mode="json", exclude_unset=True)
    assert shown["audio"]["input"]["turn_detection"] is None
    assert shown["audio"]["input"]["transcription"]["model"] == "faster-whisper-tiny.en"


@pytest.mark.parametrize(
    ("session", "code", "param"),
    [
        (
            {"type": "transcription", "audio": {"input": {"transcription": {"model": "nope"}}}},
            "model_not_found",
            None,
        ),
        (
            {"type": "transcription", "audio": {"input": {"transcription": {"model": "kokoro"}}}},
            "wrong_model_task",
            None,
        ),
        (
            {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
            "invalid_value",
            None,
        ),
        (
            {
                "type": "transcription",
                "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}},
            },
            "invalid_value",
            "session.audio.input.turn_detection.threshold",
        ),
        ({"type": "realtime"}, "invalid_value", "session.type"),
    ],
)
def test_bad_session_updates(session: dict[str, object], code: str, param: str | None) -> None:
    with pytest.raises(ClientEventError) as info:
        apply_update(SessionConfig(model="faster-whisper-tiny.en"), update(session), resolve)  # type: ignore[arg-type]
    assert info.value.code == code
    if param is not None:
        assert info.value.param == param


def test_unknown_event_types_and_bad_json() -> None:
    with pytest.raises(ClientEventError, match=r"'response\.create'") as info:
        parse_client_event('{"type": "response.create", "event_id": "e1"}')
    assert info.value.event_id == "e1"
    for raw in ("{", "[]", '"x"', b"\xff\xfe"):
        with pytest.raises(ClientEventError) as bad:
            parse_client_event(raw)
        assert bad.value.code == "invalid_json"


# ---------------------------------------------------------------------- metrics and records


def test_metrics_and_records_from_session_events() -> None:
    registry = CollectorRegistry()
    log = EventLog(10)
    observers = realtime_observers(registry, log, ["tiny", "base"])

    def publish(event: object) -> None:
        for observer in observers:
            observer(event)  # type: ignore[arg-type]

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    assert value("earshot_realtime_sessions_open", model="tiny") == 0
    publish(SessionStarted(session_id="s1", model="base", at=1.0))
    publish(SessionModelChanged(session_id="s1", model="tiny", at=1.0, previous="base"))
    publish(AudioReceived(session_id="s1", model="tiny", at=1.0, seconds=0.5))
    publish(
        TurnCompleted(
            session_id="s1", model="tiny", at=2.0, item_id="i", audio_s=0.5, inference_s=0.2, latency_s=0.3
        )
    )
    assert value("earshot_realtime_sessions_open", model="tiny") == 1
    assert value("earshot_realtime_sessions_open", model="base") == 0
    publish(
        SessionEnded(
            session_id="s1",
            model="tiny",
            at=3.0,
            ended=SessionEnd.IDLE,
            duration_s=2,
            turns=1,
            audio_s=0.5,
            close_code=1000,
        )
    )
    publish(SessionRefused(session_id="s2", model="base", at=3.0, open_sessions=1))
    publish(SessionStarted(session_id="s3", model="not-in-the-catalog", at=3.0))
    assert value("earshot_realtime_sessions_open", model="tiny") == 0
    assert value("earshot_realtime_sessions_total", model="tiny", ended="idle") == 1
    assert value("earshot_realtime_sessions_total", model="base", ended="refused") == 1
    assert value("earshot_realtime_turns_total", model="tiny") == 1
    assert value("earshot_realtime_audio_seconds_total", model="tiny") == 0.5
    assert value("earshot_realtime_transcript_latency_seconds_sum", model="tiny") == pytest.approx(0.3)
    assert value("earshot_realtime_sessions_open", model="not-in-the-catalog") == 0
    kinds = [r["event"] for r in log.recent()]
    assert "realtime_turn_completed" not in kinds  # not recorded: turns would flood the ring
    assert kinds[:4] == [
        "realtime_session_started",
        "realtime_session_model_changed",
        "realtime_session_ended",
        "realtime_session_refused",
    ]
    ended = log.recent()[2]
    assert ended["ended"] == "idle"
    assert ended["turns"] == 1
    assert ended["session_id"] == "s1"
