"""Realtime transcription: end-of-speech-to-transcript latency against offline transcription of the
same audio, and how many sessions at once this machine keeps in real time (tiny.en)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx

from bench.common import (
    JFK,
    STT_MODEL,
    BenchResult,
    Context,
    Row,
    earshot_server,
    histogram_mean,
    load_model,
    log,
    median,
    median_ratio_row,
    quiesce,
    scrape,
    summary,
    transcribe,
)

NAME = "realtime"
TITLE = "Realtime sessions (tiny.en, jfk.flac as pcm16 24 kHz)"
TARGET = 1.2
CHUNK = 4800  # bytes: 100 ms of pcm16 at 24 kHz
LEVELS = (1, 2, 3, 4, 6, 8, 12, 16)
METHOD = f"""\
latency: one session (`openai` SDK realtime client, `intent=transcription`, model {STT_MODEL},
`turn_detection: null`) appends the whole of jfk.flac (resampled to pcm16 24 kHz, 100 ms chunks, as
fast as it goes), then sends `input_audio_buffer.commit`; timed: from sending the commit (the end of
speech) to receiving the turn's `completed` event. offline: `POST /v1/audio/transcriptions` of
jfk.flac (the same 11 s; the server decodes the upload) on the same server, from the request sent to
the JSON read. Alternating, medians; ratio = realtime / offline. The server's own view of the same
latency (earshot_realtime_transcript_latency_seconds, commit to completed sent) is reported too.
sessions: N sessions at once, each streaming jfk.flac (plus 1.5 s of silence) at real-time pace
(100 ms every 100 ms) with `server_vad` (defaults: threshold 0.5, prefix 300 ms, silence 500 ms).
A level holds when, in every session, every turn's `completed` arrives less than
max(1 s, the turn's own audio seconds) after its `speech_stopped` (transcription keeps pace with
speech, queueing included). N = {", ".join(map(str, LEVELS))}, up to the first level that does not hold;
the figure is the largest N that held."""


def _pcm24() -> bytes:
    from tests.support.audio import pcm16

    return pcm16(JFK, rate=24_000)


async def _connect(url: str) -> Any:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    return client.realtime.connect(extra_query={"intent": "transcription"})


def _session(turn_detection: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": STT_MODEL, "language": "en"},
                "turn_detection": turn_detection,
            }
        },
    }


async def _until(conn: Any, kind: str) -> Any:
    while True:
        event = await conn.recv()
        if event.type == kind:
            return event
        if event.type == "error":
            raise RuntimeError(f"error event: {event.error}")


async def _commit_latency(url: str, pcm: bytes) -> tuple[float, str]:
    async with await _connect(url) as conn:
        await conn.session.update(session=_session(None))
        await _until(conn, "session.updated")
        for i in range(0, len(pcm), CHUNK):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + CHUNK]).decode())
        await conn.send_raw('{"type": "session.update", "session": {"type": "transcription"}}')
        await _until(conn, "session.updated")  # every append has been handled
        started = time.perf_counter()
        await conn.input_audio_buffer.commit()
        done = await asyncio.wait_for(
            _until(conn, "conversation.item.input_audio_transcription.completed"), 300
        )
        return time.perf_counter() - started, str(done.transcript)


async def _live_session(url: str, pcm: bytes) -> list[dict[str, float]]:
    """Stream at real-time pace with server VAD; per turn: audio seconds, stop-to-completed seconds."""
    turns: list[dict[str, float]] = []
    async with await _connect(url) as conn:
        await conn.session.update(session=_session({"type": "server_vad"}))
        await _until(conn, "session.updated")
        stopped: dict[str, float] = {}
        committed = 0

        async def send() -> None:
            t0 = time.perf_counter()
            for n, i in enumerate(range(0, len(pcm), CHUNK)):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + CHUNK]).decode())
                await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.1 - time.perf_counter()))

        sender = asyncio.create_task(send())
        try:
            while not (sender.done() and committed == len(turns)):
                try:
                    event = await asyncio.wait_for(conn.recv(), 1.0)
                except TimeoutError:
                    continue
                if event.type == "input_audio_buffer.speech_stopped":
                    stopped[event.item_id] = time.perf_counter()
                elif event.type == "input_audio_buffer.committed":
                    committed += 1
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    turns.append(
                        {
                            "audio_s": float(event.usage.seconds),
                            "latency_s": time.perf_counter()
                            - stopped.get(event.item_id, time.perf_counter()),
                        }
                    )
                elif event.type == "error":
                    raise RuntimeError(f"error event: {event.error}")
            await sender
        finally:
            sender.cancel()
    return turns


async def _level(url: str, pcm: bytes, n: int) -> tuple[bool, list[dict[str, float]]]:
    results = await asyncio.wait_for(asyncio.gather(*(_live_session(url, pcm) for _ in range(n))), 600)
    turns = [t for session in results for t in session]
    held = all(session for session in results) and all(t["latency_s"] < max(1.0, t["audio_s"]) for t in turns)
    return held, turns


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE, METHOD)
    reps = ctx.reps(7, 2)
    pcm = _pcm24()
    live_pcm = pcm + bytes(72_000)
    audio = JFK.read_bytes()
    with (
        earshot_server(ctx, NAME, max_realtime_sessions=max(LEVELS)) as server,
        httpx.Client(base_url=server.url, timeout=300) as http,
    ):
        load_model(http, STT_MODEL)
        log("warm-up: one offline request, one realtime turn")
        transcribe(http, audio)
        asyncio.run(_commit_latency(server.url, pcm))
        quiesce()
        before = scrape(http)
        realtime: list[float] = []
        offline: list[float] = []
        texts: dict[str, str] = {}
        for i in range(reps):
            order = ("realtime", "offline") if i % 2 == 0 else ("offline", "realtime")
            for side in order:
                if side == "realtime":
                    seconds, texts["realtime"] = asyncio.run(_commit_latency(server.url, pcm))
                    realtime.append(seconds)
                else:
                    t0 = time.perf_counter()
                    texts["offline"] = str(transcribe(http, audio)["text"])
                    offline.append(time.perf_counter() - t0)
        after = scrape(http)
        server_latency = histogram_mean(
            before, after, "earshot_realtime_transcript_latency_seconds", model=STT_MODEL
        )
        log(f"latency: realtime {median(realtime):.3f} s, offline {median(offline):.3f} s")
        result.rows.append(
            median_ratio_row(
                NAME,
                "commit to completed vs offline transcription, median",
                realtime,
                offline,
                TARGET,
                f"n={reps} each; server-side (histogram mean) {server_latency * 1000:.0f} ms; "
                f"same text: {texts.get('realtime', '').strip() == texts.get('offline', '').strip()}",
            )
        )
        levels: list[dict[str, Any]] = []
        held_max = 0
        for n in LEVELS if not ctx.quick else LEVELS[:4]:
            quiesce()
            log(f"{n} session(s) at once, real-time pace")
            held, turns = asyncio.run(_level(server.url, live_pcm, n))
            lat = [t["latency_s"] for t in turns]
            levels.append(
                {
                    "sessions": n,
                    "held": held,
                    "turns": len(turns),
                    "latency_p50_ms": round(summary(lat)["median"] * 1000),
                    "latency_max_ms": round(summary(lat)["max"] * 1000),
                }
            )
            if not held:
                break
            held_max = n
        result.detail_table = levels
        result.rows.append(
            Row(
                NAME,
                "sessions at once in real time",
                float(held_max),
                "sessions",
                note="largest N whose every turn completed within max(1 s, its audio) of speech stop",
            )
        )
    result.details = {
        "model": STT_MODEL,
        "iterations": reps,
        "realtime_s": summary(realtime),
        "offline_s": summary(offline),
        "server_latency_mean_s": server_latency,
        "texts": texts,
        "levels": levels,
        "target": TARGET,
    }
    return result
