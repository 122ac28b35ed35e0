"""The fleet end to end: a real Ray cluster on loopback (head + second node), 2 workers with 1 model
each, real models, the official openai SDK through Serve's HTTP proxy and earshot's gateway.

Order matters within the module (one cluster): affinity first (a fresh fleet), then the rest, the
killed worker last.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.conftest import words
from tests.fleet.conftest import LOAD_TIMEOUT_S, FleetServer

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"
SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def client(fleet_server: FleetServer) -> openai.OpenAI:
    # No SDK retries: a retried 503 would hide what the fleet answered.
    return openai.OpenAI(
        base_url=fleet_server.url + "/v1", api_key="unused", max_retries=0, timeout=LOAD_TIMEOUT_S + 30
    )


@pytest.fixture(scope="module")
def jfk(jfk_flac: Path) -> bytes:
    return jfk_flac.read_bytes()


def _loads(server: FleetServer) -> Counter[tuple[str, str]]:
    return Counter((e["model"], e["worker"]) for e in server.events() if e["event"] == "model_loaded")


def _has_jfk(text: str) -> bool:
    said = " ".join(words(text))
    return "ask not what your country can do for you" in said


def test_alternating_models_each_load_once_on_its_own_worker(
    fleet_server: FleetServer, client: openai.OpenAI, jfk: bytes
) -> None:
    for i in range(12):
        model = TINY if i % 2 == 0 else BASE
        result = client.audio.transcriptions.create(model=model, file=("jfk.flac", jfk))
        assert _has_jfk(result.text), (model, result.text)
    loads = _loads(fleet_server)
    assert sorted(m for m, _ in loads) == [BASE, TINY], loads  # one load each: no thrash
    assert all(n == 1 for n in loads.values()), loads
    assert len({w for _, w in loads}) == 2, loads  # each on its own worker
    ps = fleet_server.get("/api/ps")
    held = {m["model"]: m["worker"] for m in ps["models"]}
    assert held == {m: w for m, w in loads}, (held, loads)
    assert {w["worker"] for w in ps["workers"]} == set(held.values())


def test_ps_events_and_cli_show_the_worker(fleet_server: FleetServer) -> None:
    from earshot.ps import run_ps

    out = io.StringIO()
    assert run_ps(fleet_server.url, None, False, out) == 0
    table = out.getvalue()
    assert "WORKER" in table.splitlines()[0]
    for model in fleet_server.get("/api/ps")["models"]:
        assert model["worker"] in table
    started = {e["worker"] for e in fleet_server.events() if e["event"] == "worker_started"}
    assert {w["worker"] for w in fleet_server.get("/api/ps")["workers"]} <= started


def test_errors_cross_the_ray_boundary_as_the_single_server_maps_them(
    client: openai.OpenAI, jfk: bytes
) -> None:
    with pytest.raises(openai.BadRequestError) as voice:
        client.audio.speech.create(model=KOKORO, voice="no-such-voice", input="Hi")  # type: ignore[arg-type]
    body: Any = voice.value.body
    assert body["code"] == "invalid_voice"
    assert body["param"] == "voice"
    assert "no-such-voice" in body["message"]
    with pytest.raises(openai.BadRequestError) as language:
        client.audio.transcriptions.create(model=TINY, file=("jfk.flac", jfk), language="fr")
    body = language.value.body
    assert body["code"] == "unsupported_language"
    assert body["param"] == "language"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.audio.transcriptions.create(model="no-such-model", file=("jfk.flac", jfk))
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]


def _pcm_to_wav(pcm: bytes, rate: int = 24000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def test_speech_round_trips(client: openai.OpenAI) -> None:
    speech = client.audio.speech.create(model=KOKORO, voice="alloy", input=SENTENCE, response_format="wav")
    text = client.audio.transcriptions.create(model=TINY, file=("speech.wav", speech.content)).text
    assert "quick brown fox" in " ".join(words(text)), text


def test_streamed_transcription_arrives_in_order(client: openai.OpenAI, jfk: bytes) -> None:
    stream = client.audio.transcriptions.create(model=TINY, file=("jfk.flac", jfk), stream=True)
    events = list(stream)
    assert events[-1].type == "transcript.text.done"
    deltas = [e for e in events[:-1] if e.type == "transcript.text.delta"]
    assert deltas
    assert _has_jfk(events[-1].text)  # type: ignore[union-attr]
    assert words(events[-1].text) == words(" ".join(e.delta for e in deltas))  # type: ignore[union-attr]


def test_streamed_speech_arrives_in_order(fleet_server: FleetServer, client: openai.OpenAI) -> None:
    text = "The first light came over the hills. Birds began to sing. " + SENTENCE
    body = {"model": KOKORO, "voice": "alloy", "input": text, "response_format": "pcm", "stream": True}
    chunks: list[bytes] = []
    with (
        httpx.Client(base_url=fleet_server.url, timeout=LOAD_TIMEOUT_S + 30) as http,
        http.stream("POST", "/v1/audio/speech", json=body) as response,
    ):
        assert response.status_code == 200
        chunks = [c for c in response.iter_bytes() if c]
    assert len(chunks) >= 2
    # In order: the pieces put together say the sentences in the order written.
    heard = " ".join(
        words(
            client.audio.transcriptions.create(model=TINY, file=("s.wav", _pcm_to_wav(b"".join(chunks)))).text
        )
    )
    assert heard.index("first light") < heard.index("birds") < heard.index("quick brown fox"), heard


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_build_app_is_the_serve_application_a_rayservice_names(
    fleet_server: FleetServer, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`earshot.fleet.app:build_app` (the KubeRay RayService's import_path), called where Serve
    calls it (connected to the cluster), settings from EARSHOT_*: a Serve Application, sharing the
    fleet's board (found by name, not a second one)."""
    import ray
    from ray import serve

    from earshot.fleet.app import build_app
    from earshot.fleet.board import BOARD_NAME
    from earshot.fleet.run import NAMESPACE

    monkeypatch.setenv("EARSHOT_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("EARSHOT_ALLOW_HUB_MODELS", "false")
    app = build_app({})
    assert isinstance(app, serve.Application), type(app)
    assert isinstance(build_app({"fleet_workers": 3}), serve.Application)
    board = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
    assert board._actor_id == fleet_server.fleet.board._actor_id
    assert len(fleet_server.get("/api/ps")["workers"]) == 2  # building deployed nothing


def test_a_killed_worker_is_replaced_and_no_request_fails_badly(
    fleet_server: FleetServer, client: openai.OpenAI, jfk: bytes
) -> None:
    ps = fleet_server.get("/api/ps")
    victim = next(m["worker"] for m in ps["models"] if m["model"] == TINY)
    pid = next(w["pid"] for w in ps["workers"] if w["worker"] == victim)
    assert psutil.Process(pid).is_running()
    starts_before = _metric(fleet_server.metrics(), "earshot_fleet_worker_starts_total")

    outcomes: list[Any] = []

    def transcribe() -> None:
        started = time.monotonic()
        try:
            text = client.audio.transcriptions.create(model=TINY, file=("jfk.flac", jfk)).text
            outcomes.append(("ok", _has_jfk(text), time.monotonic() - started))
        except openai.APIStatusError as exc:
            outcomes.append(("status", exc.status_code, exc.response.headers.get("retry-after"), exc.body))
        except openai.APITimeoutError:
            outcomes.append(("timeout",))

    threads = [threading.Thread(target=transcribe) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(LOAD_TIMEOUT_S + 60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(outcomes) == 4, outcomes
    for outcome in outcomes:
        if outcome[0] == "ok":
            assert outcome[1], outcome  # the right words
        else:  # never a 500 or a hang: a clean, retryable 503
            assert outcome[0] == "status", outcome
            assert outcome[1] == 503, outcome
            assert outcome[2] is not None, outcome  # Retry-After

    # The fleet serves again within 60 s, and the restart shows in the events and the metrics.
    deadline = time.monotonic() + 60
    while True:
        kinds = {(e["event"], e["worker"]) for e in fleet_server.events() if e["model"] is None}
        replaced = ("worker_lost", victim) in kinds and sum(k == "worker_started" for k, _ in kinds) >= 3
        if replaced and len(fleet_server.get("/api/ps")["workers"]) == 2:
            break
        assert time.monotonic() < deadline, f"no replacement within 60 s: {sorted(kinds)}"
        time.sleep(0.5)
    result = client.audio.transcriptions.create(model=TINY, file=("jfk.flac", jfk))
    assert _has_jfk(result.text)
    metrics = fleet_server.metrics()
    # (>=: a worker the board once took for lost under heavy load registers again, and counts)
    assert _metric(metrics, "earshot_fleet_worker_starts_total") >= starts_before + 1
    assert _metric(metrics, "earshot_fleet_worker_losses_total") >= 1
    assert _metric(metrics, "earshot_fleet_workers") == 2
    assert victim not in {m.get("worker") for m in fleet_server.get("/api/ps")["models"]}
