"""Every client mistake gets the OpenAI error envelope with its status, and the server keeps serving."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.server import Server, run_server

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"
KEY = "sk-test-0123456789"


def envelope(
    response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> str:
    """Check status and envelope; return the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == ("server_error" if status >= 500 else error["type"])
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return str(error["message"])


@pytest.fixture(scope="module")
def strict(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One model at a time, a 1 MiB upload limit, a short wait for room, and an API key. The wait
    (model_load_timeout) also bounds each load: 15 s leaves a cold Kokoro or base load on a loaded CI
    machine ample time (3 s did not, once), and keeps the cache-full test's wait short."""
    with run_server(
        models_dir,
        tmp_path_factory.mktemp("strict"),
        max_models=1,
        model_load_timeout=15,
        max_upload_bytes=1024 * 1024,
        api_key=KEY,
        max_input_chars=500,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(strict: Server) -> Iterator[httpx.Client]:
    with strict.client() as client:
        yield client


def still_serving(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/v1/models").status_code == 200


def stt(http: httpx.Client, data: bytes, **fields: Any) -> httpx.Response:
    return http.post(
        "/v1/audio/transcriptions", files={"file": ("a.flac", data)}, data={"model": TINY, **fields}
    )


def test_unknown_model_is_404_with_close_ids(http: httpx.Client, jfk_flac: Path) -> None:
    message = envelope(
        stt(http, jfk_flac.read_bytes(), model="faster-whisper-tiny"),
        404,
        param="model",
        code="model_not_found",
    )
    assert "faster-whisper-tiny.en" in message
    envelope(http.get("/v1/models/no-such-model"), 404, code="model_not_found")
    # an owner/name id is looked up on the Hub (tests/integration/test_hub_models.py); unloading one
    # the catalog does not list is a plain 404
    envelope(http.delete("/api/ps/Systran/not-here"), 404, code="model_not_found")
    still_serving(http)


def test_wrong_task_is_400(http: httpx.Client, jfk_flac: Path) -> None:
    envelope(stt(http, jfk_flac.read_bytes(), model=KOKORO), 400, param="model", code="wrong_model_task")
    r = http.post("/v1/audio/speech", json={"model": TINY, "input": "hi", "voice": "alloy"})
    envelope(r, 400, param="model", code="wrong_model_task")


def test_translation_needs_a_multilingual_model(http: httpx.Client, jfk_flac: Path) -> None:
    r = http.post(
        "/v1/audio/translations", files={"file": ("a.flac", jfk_flac.read_bytes())}, data={"model": TINY}
    )
    message = envelope(r, 400, param="model", code="unsupported_task")
    assert "English-only" in message


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "empty"),
        (b"\x00" * 2048, "zeros"),
        (bytes(range(256)) * 64, "random bytes"),
        (b"fLaC\x00\x00\x00\x22" + b"\x00" * 30, "truncated flac"),
    ],
)
def test_undecodable_audio_is_400(http: httpx.Client, payload: bytes, why: str) -> None:
    envelope(stt(http, payload), 400, param="file", code="invalid_audio")
    still_serving(http)


def test_missing_fields_and_bad_values_are_400(http: httpx.Client, jfk_flac: Path) -> None:
    audio = jfk_flac.read_bytes()
    envelope(http.post("/v1/audio/transcriptions", data={"model": TINY}), 400)
    envelope(http.post("/v1/audio/transcriptions", files={"file": ("a.flac", audio)}), 400)
    envelope(stt(http, audio, response_format="xml"), 400, param="response_format")
    envelope(stt(http, audio, temperature="5"), 400, param="temperature")
    envelope(stt(http, audio, temperature="warm"), 400, param="temperature")
    envelope(stt(http, audio, language="xx"), 400, param="language")
    envelope(stt(http, audio, keep_alive="-7"), 400, param="keep_alive")
    envelope(stt(http, audio, **{"timestamp_granularities[]": "word"}), 400, param="timestamp_granularities")


def test_speech_bad_input_is_400(http: httpx.Client) -> None:
    def speech(**body: Any) -> httpx.Response:
        return http.post(
            "/v1/audio/speech", json={"model": KOKORO, "input": "Hello.", "voice": "alloy", **body}
        )

    envelope(speech(input=""), 400, param="input")
    envelope(speech(input="   \n"), 400, param="input")
    envelope(speech(input="x" * 501), 400, param="input", code="string_above_max_length")
    envelope(speech(speed=10), 400, param="speed")
    envelope(speech(speed=0.1), 400, param="speed")
    envelope(speech(voice="nobody"), 400, param="voice", code="invalid_voice")
    envelope(speech(response_format="ogg"), 400, param="response_format")
    bad_json = http.post(
        "/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"}
    )
    envelope(bad_json, 400)
    still_serving(http)


def test_wrong_method_is_405_envelope(http: httpx.Client) -> None:
    envelope(http.get("/v1/audio/speech"), 405)
    envelope(http.get("/no/such/route"), 404)


def test_upload_over_limit_is_413(http: httpx.Client) -> None:
    envelope(stt(http, b"\x00" * (3 * 1024 * 1024)), 413, code="request_too_large")
    still_serving(http)


def test_huge_declared_upload_is_refused_before_the_body_arrives(strict: Server) -> None:
    """A 10 GB Content-Length gets 413 at once: the server does not wait for (or buffer) the body."""
    host, port = strict.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            "POST /v1/audio/transcriptions HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\n"
            "Content-Length: 10000000000\r\n\r\n"
        )
        started = time.monotonic()
        sock.sendall(head.encode() + b"--xyz\r\n")
        reply = sock.recv(4096).decode(errors="replace")
        assert time.monotonic() - started < 5
    assert reply.startswith("HTTP/1.1 413"), reply


def test_api_key_required_except_health_and_metrics(strict: Server) -> None:
    with httpx.Client(base_url=strict.url) as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
        message = envelope(anonymous.get("/v1/models"), 401, code="invalid_api_key")
        assert "Bearer" in message
        r = anonymous.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        envelope(r, 401, code="invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        envelope(anonymous.get("/api/ps", headers={"Authorization": KEY}), 401)  # no scheme
        envelope(anonymous.get("/api/config"), 401)
        assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    sdk = openai.OpenAI(base_url=strict.url + "/v1", api_key=KEY, max_retries=0)
    assert any(m.id == TINY for m in sdk.models.list())
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_config_redacts_the_key(http: httpx.Client) -> None:
    shown = http.get("/api/config").json()["settings"]
    assert shown["api_key"] == {"value": "**********", "source": "environment variable EARSHOT_API_KEY"}
    assert KEY not in http.get("/api/config").text


def test_cache_full_is_503_with_retry_after(strict: Server, http: httpx.Client, jfk_flac: Path) -> None:
    """max_models=1: while a streaming speech request holds Kokoro, a Whisper request cannot get room
    within model_load_timeout (15 s) and gets 503 + Retry-After; once the stream ends, it works."""
    long_text = " ".join(f"This is sentence number {i} of a long text." for i in range(11))
    assert len(long_text) <= 500
    started = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with (
            strict.client() as c,
            c.stream(
                "POST",
                "/v1/audio/speech",
                json={
                    "model": KOKORO,
                    "input": long_text,
                    "voice": "alloy",
                    "response_format": "pcm",
                    "stream": True,
                    "speed": 0.25,
                },
            ) as r,
        ):
            assert r.status_code == 200
            for _ in r.iter_raw(1024):
                started.set()
                release.wait(60)
                break

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert started.wait(120)
        r = stt(http, jfk_flac.read_bytes())
        message = envelope(r, 503, code="cache_full")
        assert r.headers["retry-after"].isdigit()
        assert "in use" in message
    finally:
        release.set()
        holder.join(60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ps = http.get("/api/ps").json()["models"]
        if all(m["in_use"] == 0 for m in ps):
            break
        time.sleep(0.2)
    assert all(m["in_use"] == 0 for m in http.get("/api/ps").json()["models"]), http.get(
        "/api/ps"
    ).json()  # the client left: released
    assert stt(http, jfk_flac.read_bytes()).status_code == 200


def test_load_timeout_is_503(models_dir: Path, tmp_path: Path, jfk_flac: Path) -> None:
    with run_server(models_dir, tmp_path, model_load_timeout=0.01) as srv, srv.client() as client:
        r = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.flac", jfk_flac.read_bytes())},
            data={"model": BASE},
        )
        message = envelope(r, 503, code="model_load_timeout")
        assert r.headers["retry-after"].isdigit()
        assert BASE in message
        still_serving(client)
