"""Realtime transcription sessions driven by the official `openai` SDK's realtime client
(`AsyncOpenAI.realtime.connect(extra_query={"intent": "transcription"})`) against the real server,
with jfk.flac resampled to pcm16 24 kHz, streamed in 100 ms chunks faster than real time."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import words
from tests.support.audio import pcm16
from tests.support.server import Server, run_server

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
PHRASE = words("ask not what your country can do for you")
CHUNK = 4800  # bytes: 100 ms of pcm16 at 24 kHz
TIMEOUT = 240  # seconds for a whole session on a shared, loaded machine


@pytest.fixture(scope="module")
def jfk24(jfk_flac: Path) -> bytes:
    """jfk.flac as pcm16 24 kHz, with 1.5 s of silence after it (so VAD sees the speech end)."""
    return pcm16(jfk_flac, rate=24_000) + bytes(72_000)


def contains(text: str, phrase: list[str]) -> bool:
    have = words(text)
    return any(have[i : i + len(phrase)] == phrase for i in range(len(have) - len(phrase) + 1))


def client(server: Server, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)


@contextlib.asynccontextmanager
async def session(server: Server, api_key: str = "unused", **options: Any) -> AsyncIterator[Any]:
    async with client(server, api_key).realtime.connect(
        extra_query={"intent": "transcription"}, **options
    ) as conn:
        yield conn


def transcription(model: str, turn_detection: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": model, "language": "en"},
                "turn_detection": turn_detection,
            }
        },
    }


async def stream(conn: Any, audio: bytes, pause: float = 0.01) -> None:
    """Append `audio` in 100 ms chunks, about 10x faster than real time."""
    for i in range(0, len(audio), CHUNK):
        await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i : i + CHUNK]).decode())
        await asyncio.sleep(pause)


async def next_event(conn: Any, *types: str, timeout: float = TIMEOUT) -> Any:
    """The next event of one of `types` (others skipped); fails on an `error` event."""

    async def wait() -> Any:
        while True:
            event = await conn.recv()
            if event.type in types:
                return event
            if event.type == "error":
                pytest.fail(f"error event: {event.error}")

    return await asyncio.wait_for(wait(), timeout)


async def vad_turns(conn: Any, audio: bytes) -> tuple[list[str], list[Any]]:
    """Stream `audio` with server VAD on; the completed transcripts, and every event seen."""
    sender = asyncio.create_task(stream(conn, audio))
    seen: list[Any] = []
    committed: list[str] = []
    done: dict[str, str] = {}
    try:
        async with asyncio.timeout(TIMEOUT):
            while not (sender.done() and committed and set(committed) <= set(done)):
                try:
                    event = await asyncio.wait_for(conn.recv(), 1.0)
                except TimeoutError:
                    continue
                seen.append(event)
                if event.type == "error":
                    pytest.fail(f"error event: {event.error}")
                if event.type == "input_audio_buffer.committed":
                    committed.append(event.item_id)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    done[event.item_id] = event.transcript
        await sender
    finally:
        sender.cancel()
    return [done[i] for i in committed], seen


def ps(server: Server) -> dict[str, dict[str, Any]]:
    body = httpx.get(server.url + "/api/ps", timeout=30).json()
    return {m["model"]: m for m in body["models"]}


def metric(server: Server, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def eventually(check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


async def closed_with(conn: Any) -> tuple[int, str]:
    """The close code and reason the server ended the connection with."""
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(conn.recv(), 60)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


# ---------------------------------------------------------------------- default server


async def test_server_vad_turns(server: Server, jfk24: bytes) -> None:
    async with session(server) as conn:
        created = await next_event(conn, "session.created")
        assert created.session.type == "transcription"
        await conn.session.update(
            session=transcription(TINY, {"type": "server_vad", "silence_duration_ms": 800})
        )
        updated = await next_event(conn, "session.updated")
        assert updated.session.audio.input.transcription.model == TINY
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 800
        open_now = ps(server)[TINY]
        assert open_now["sessions"] == 1
        assert open_now["in_use"] >= 1
        texts, seen = await vad_turns(conn, jfk24)
    kinds = [e.type for e in seen]
    for kind in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
    ):
        assert kind in kinds
    # Each turn: started, then stopped, then committed, for one item id.
    started = [e for e in seen if e.type == "input_audio_buffer.speech_started"]
    stopped = {e.item_id: e for e in seen if e.type == "input_audio_buffer.speech_stopped"}
    for event in started:
        assert event.item_id in stopped
        assert stopped[event.item_id].audio_end_ms > event.audio_start_ms
    assert contains(" ".join(texts), PHRASE), texts

    def after() -> None:
        assert metric(server, "earshot_realtime_sessions_open", model=TINY) == 0
        assert metric(server, "earshot_realtime_sessions_total", model=TINY, ended="client") >= 1

    eventually(after)
    assert metric(server, "earshot_realtime_turns_total", model=TINY) >= len(texts)
    assert metric(server, "earshot_realtime_audio_seconds_total", model=TINY) >= 12.0
    assert metric(server, "earshot_realtime_transcript_latency_seconds_count", model=TINY) >= len(texts)
    records = httpx.get(server.url + "/api/events", timeout=30).json()["events"]
    ended = [r for r in records if r["event"] == "realtime_session_ended" and r["model"] == TINY]
    assert ended
    assert ended[-1]["turns"] >= len(texts)
    assert ended[-1]["ended"] == "client"
    lines = [line for line in server.log_lines() if line.get("event") == "realtime_session_ended"]
    assert lines
    assert lines[-1]["audio_s"] >= 12.0


async def test_manual_commit(server: Server, jfk24: bytes) -> None:
    async with session(server) as conn:
        await conn.session.update(session=transcription(TINY, None))
        updated = await next_event(conn, "session.updated")
        assert updated.session.audio.input.turn_detection is None
        await stream(conn, jfk24, pause=0)
        await conn.input_audio_buffer.commit()
        committed = await next_event(conn, "input_audio_buffer.committed")
        done = await next_event(conn, "conversation.item.input_audio_transcription.completed")
        assert done.item_id == committed.item_id
        assert contains(done.transcript, PHRASE), done.transcript
        assert done.usage.seconds == pytest.approx(12.5, abs=0.2)


async def test_two_sessions_on_two_models(server: Server, jfk24: bytes) -> None:
    async def vad_on_tiny() -> str:
        async with session(server) as conn:
            await conn.session.update(session=transcription(TINY, {"type": "server_vad"}))
            texts, _ = await vad_turns(conn, jfk24)
            return " ".join(texts)

    async def commit_on_base() -> str:
        async with session(server) as conn:
            await conn.session.update(session=transcription("whisper-1", None))  # alias of base
            updated = await next_event(conn, "session.updated")
            assert updated.session.audio.input.transcription.model == BASE
            await stream(conn, jfk24)
            await conn.input_audio_buffer.commit()
            done = await next_event(conn, "conversation.item.input_audio_transcription.completed")
            return str(done.transcript)

    tiny, base = await asyncio.gather(vad_on_tiny(), commit_on_base())
    assert contains(tiny, PHRASE), tiny
    assert contains(base, PHRASE), base


async def test_unknown_model_is_an_error_and_the_session_goes_on(server: Server, jfk24: bytes) -> None:
    async with session(server) as conn:
        await conn.session.update(session=transcription("no-such-model", None))
        error = await next_event(conn, "error", "session.updated")
        assert error.type == "error"
        assert error.error.code == "model_not_found"
        assert "no-such-model" in error.error.message
        await conn.session.update(session=transcription(TINY, None))
        updated = await next_event(conn, "session.updated")
        assert updated.session.audio.input.transcription.model == TINY
        await stream(conn, jfk24, pause=0)
        await conn.input_audio_buffer.commit()
        done = await next_event(conn, "conversation.item.input_audio_transcription.completed")
        assert contains(done.transcript, PHRASE)


async def test_malformed_events_get_error_events(server: Server, jfk24: bytes) -> None:
    async with session(server) as conn:
        await next_event(conn, "session.created")
        await conn.send_raw("{not json")
        await conn.send_raw('{"type": "response.create"}')
        await conn.send_raw('{"type": "input_audio_buffer.append", "audio": "%%%not base64%%%"}')
        await conn.send_raw('{"type": "input_audio_buffer.append", "event_id": "evt_1"}')
        await conn.send_raw("[1, 2]")
        errors = []
        for _ in range(5):
            event = await asyncio.wait_for(conn.recv(), 60)
            assert event.type == "error"
            errors.append(event.error)
        assert [e.code for e in errors] == [
            "invalid_json",
            "invalid_value",
            "invalid_value",
            "invalid_value",
            "invalid_json",
        ]
        assert errors[1].param == "type"
        assert "response.create" in errors[1].message
        assert errors[2].param == "audio"
        assert errors[3].event_id == "evt_1"
        assert errors[3].param == "audio"
        # Still usable.
        await conn.session.update(session=transcription(TINY, None))
        await next_event(conn, "session.updated")
        await stream(conn, jfk24, pause=0)
        await conn.input_audio_buffer.commit()
        done = await next_event(conn, "conversation.item.input_audio_transcription.completed")
        assert contains(done.transcript, PHRASE)


async def test_commit_of_an_empty_buffer_and_clear(server: Server, jfk24: bytes) -> None:
    async with session(server) as conn:
        await conn.session.update(session=transcription(TINY, None))
        await next_event(conn, "session.updated")
        await conn.input_audio_buffer.commit()
        error = await next_event(conn, "error", "input_audio_buffer.committed")
        assert error.type == "error"
        assert error.error.code == "input_audio_buffer_commit_empty"
        await stream(conn, jfk24[: CHUNK * 20], pause=0)
        await conn.input_audio_buffer.clear()
        await next_event(conn, "input_audio_buffer.cleared")
        await conn.input_audio_buffer.commit()
        error = await next_event(conn, "error", "input_audio_buffer.committed")
        assert error.type == "error"


async def test_disconnect_mid_turn_releases_the_model(server: Server, jfk24: bytes) -> None:
    async with session(server) as conn:
        await conn.session.update(session=transcription(TINY, {"type": "server_vad"}))
        await next_event(conn, "session.updated")
        await stream(conn, jfk24[: CHUNK * 40], pause=0)  # 4 s: a turn is under way
        await next_event(conn, "input_audio_buffer.speech_started")
        assert ps(server)[TINY]["in_use"] >= 1
        assert metric(server, "earshot_realtime_sessions_open", model=TINY) == 1
        await conn.input_audio_buffer.commit()
        await next_event(conn, "input_audio_buffer.committed")  # its transcription starts now

    def released() -> None:
        entry = ps(server)[TINY]
        assert entry["in_use"] == 0
        assert entry["sessions"] == 0
        assert metric(server, "earshot_realtime_sessions_open", model=TINY) == 0

    eventually(released)


# ---------------------------------------------------------------------- limits and auth


@pytest.fixture(scope="module")
def guarded(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        models_dir, tmp_path_factory.mktemp("guarded"), api_key="sekrit", max_realtime_sessions=1
    ) as srv:
        yield srv


async def test_no_api_key_closes_with_1008(guarded: Server) -> None:
    async with session(guarded, api_key="wrong") as conn:
        code, reason = await closed_with(conn)
    assert code == 1008
    assert "API key" in reason


async def test_api_key_in_the_browser_subprotocol(guarded: Server) -> None:
    options = {
        "websocket_connection_options": {"subprotocols": ["realtime", "openai-insecure-api-key.sekrit"]}
    }
    async with session(guarded, api_key="wrong", **options) as conn:
        created = await next_event(conn, "session.created")
        assert created.session.type == "transcription"


async def test_over_max_realtime_sessions_is_refused(guarded: Server) -> None:
    def none_open() -> None:  # the other tests' sessions have ended
        assert metric(guarded, "earshot_realtime_sessions_open", model=BASE) == 0

    eventually(none_open)
    async with session(guarded, api_key="sekrit") as first:
        await next_event(first, "session.created")
        async with session(guarded, api_key="sekrit") as second:
            code, reason = await closed_with(second)
        assert code == 1013
        assert "max_realtime_sessions" in reason
        await first.session.update(session=transcription(TINY, None))
        await next_event(first, "session.updated")  # the first one is untouched
    headers = {"Authorization": "Bearer sekrit"}
    text = httpx.get(guarded.url + "/metrics", headers=headers, timeout=30).text
    assert 'earshot_realtime_sessions_total{ended="refused",model="faster-whisper-base"} 1.0' in text


@pytest.fixture(scope="module")
def one_model(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        models_dir, tmp_path_factory.mktemp("one-model"), max_models=1, model_load_timeout=15
    ) as srv:
        yield srv


async def test_the_session_model_is_not_evicted_under_it(
    one_model: Server, jfk_flac: Path, jfk24: bytes
) -> None:
    async with session(one_model) as conn:
        await conn.session.update(session=transcription(TINY, None))
        await next_event(conn, "session.updated")
        assert ps(one_model)[TINY]["sessions"] == 1
        async with httpx.AsyncClient(base_url=one_model.url, timeout=120) as http:
            response = await http.post(
                "/v1/audio/transcriptions",
                files={"file": ("jfk.flac", jfk_flac.read_bytes())},
                data={"model": BASE},
            )
        assert response.status_code == 503, response.text
        assert "error" in response.json()
        models = ps(one_model)
        assert TINY in models
        assert models[TINY]["loaded"]
        assert BASE not in models
        await stream(conn, jfk24, pause=0)
        await conn.input_audio_buffer.commit()
        done = await next_event(conn, "conversation.item.input_audio_transcription.completed")
        assert contains(done.transcript, PHRASE)


@pytest.fixture(scope="module")
def impatient(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(models_dir, tmp_path_factory.mktemp("impatient"), realtime_idle_timeout=2) as srv:
        yield srv


async def test_a_silent_client_is_closed_after_realtime_idle_timeout(impatient: Server) -> None:
    async with session(impatient) as conn:
        await next_event(conn, "session.created")
        await conn.session.update(session=transcription(TINY, None))
        await next_event(conn, "session.updated")
        code, reason = await closed_with(conn)  # the client sends nothing more: the server closes
    assert code == 1000
    assert "realtime_idle_timeout" in reason

    def ended_idle() -> None:
        assert metric(impatient, "earshot_realtime_sessions_total", model=TINY, ended="idle") == 1
        assert ps(impatient)[TINY]["in_use"] == 0

    eventually(ended_idle)
