"""Schemathesis against earshot's own OpenAPI schema (GET /docs/openapi.json of a running server).

Every operation of the schema is fuzzed (schemathesis' examples, coverage and fuzzing phases,
positive and negative data), with two checks on every response: no 5xx at all, and every 4xx is the
OpenAI error envelope `{"error": {"message", "type", "param", "code"}}` served as JSON. After the
run the server still answers /health, still transcribes, and holds no references.

Bounded so that the whole fuzz stays well under three minutes on two cores:

- `max_examples` per operation (EARSHOT_FUZZ_EXAMPLES, default 40) for the fuzzing phase; the
  coverage phase adds a fixed set of boundary cases per operation;
- the server keeps one model at a time (`max_models=1`), accepts at most 200 characters of speech
  input and 1 MiB uploads, so a generated request that reaches a real model stays cheap;
- random model ids almost never name a real model, so hooks swap in a catalog id (and, for the
  speech-to-text routes, a real 2 s clip) for a share of the cases: the load / unload routes and
  the inference paths see real work too, not only 404s.

`GET /api/events?stream=true` is an endless Server-Sent-Events stream by design: that operation is
sent with a streaming client, which checks the status and the first bytes and hangs up.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.support.audio import clip_wav
from tests.support.server import Server, run_server

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"
MAX_EXAMPLES = int(os.environ.get("EARSHOT_FUZZ_EXAMPLES", "40"))
ENVELOPE_KEYS = {"message", "type", "param", "code"}
# The model a real request on each route uses, when a hook swaps one in.
REAL_MODEL = {
    "/v1/audio/speech": KOKORO,
    "/v1/audio/transcriptions": TINY,
    "/v1/audio/translations": BASE,
}


@pytest.fixture(scope="module")
def fuzz_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        models_dir,
        tmp_path_factory.mktemp("fuzz"),
        max_models=1,
        max_input_chars=200,
        max_upload_bytes=1024 * 1024,
        model_load_timeout=120,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def clip(jfk_flac: Path) -> bytes:
    return clip_wav(jfk_flac, 2.0)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server, clip: bytes) -> Any:
    """earshot's own schema, as the running server serves it, with the real-model hooks."""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/docs/openapi.json", timeout=30)
    assert schema.raw_schema["info"]["title"] == "earshot"

    @schema.hook("flatmap_body")
    def real_model_in_body(context: Any, body: Any) -> Any:
        real = REAL_MODEL.get(context.operation.path) if context.operation else None
        if real is None or not isinstance(body, dict) or "model" not in body:
            return st.just(body)
        options = [body, {**body, "model": real}]
        if "file" in body:
            options.append({**body, "model": real, "file": clip})
        else:  # speech: also the default voice at normal speed, so some synthesis really runs
            rest = {k: v for k, v in body.items() if k not in ("voice", "speed")}
            options.append({**rest, "model": real})
        return st.sampled_from(options)

    @schema.hook("flatmap_path_parameters")
    def real_model_in_path(context: Any, params: Any) -> Any:
        if not isinstance(params, dict) or "model_id" not in params:
            return st.just(params)
        return st.sampled_from([params, *({**params, "model_id": m} for m in REAL_MODEL.values())])

    return schema


@pytest.fixture(autouse=True)
def _pytest9_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis' lazy schema renames the test node through `node._nodeid`, which pytest 9 no
    longer has (AttributeError); give it one. Only the reported test names depend on it."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def check_envelope(status: int, content_type: str, body: bytes, where: str) -> None:
    assert status < 500, f"{where}: {status} {body[:500]!r}"
    if status < 400:
        return
    assert content_type.startswith("application/json"), f"{where}: {status} {content_type} {body[:300]!r}"
    data = json.loads(body)
    assert isinstance(data, dict), f"{where}: {body[:300]!r}"
    assert set(data) == {"error"}, f"{where}: {body[:300]!r}"
    error = data["error"]
    assert set(error) == ENVELOPE_KEYS, f"{where}: {body[:300]!r}"
    assert isinstance(error["message"], str), f"{where}: {body[:300]!r}"
    assert error["message"], f"{where}: {body[:300]!r}"
    assert error["type"] in ("invalid_request_error", "authentication_error"), f"{where}: {body[:300]!r}"


def call_events(case: Any, base_url: str) -> None:
    """GET /api/events with a streaming client: `?stream=true` never ends (by design)."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    with requests.request(**kwargs, stream=True, timeout=30) as response:
        where = f"{case.operation.label}: {case.as_curl_command(base_url=base_url)}"
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            assert response.status_code == 200, where
            assert next(response.iter_content(16), b""), where  # the hello comment
            return
        check_envelope(
            response.status_code, response.headers.get("content-type", ""), response.content, where
        )


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_no_5xx_and_every_error_is_the_envelope(case: Any, fuzz_server: Server) -> None:
    if case.operation.path == "/api/events" and case.method.upper() == "GET":
        call_events(case, fuzz_server.url)
        return
    response = case.call(base_url=fuzz_server.url, timeout=120)
    where = f"{case.operation.label}: {case.as_curl_command(base_url=fuzz_server.url)}"
    if case.method.upper() == "HEAD":  # no body to check
        assert response.status_code < 500, where
        return
    check_envelope(
        response.status_code, response.headers.get("content-type", [""])[0], response.content, where
    )


def test_server_still_serves_after_the_fuzz(fuzz_server: Server, clip: bytes) -> None:
    assert fuzz_server.alive()
    with fuzz_server.client(timeout=120) as client:
        assert client.get("/health").status_code == 200
        r = client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", clip)}, data={"model": TINY})
        assert r.status_code == 200, r.text
        assert "fellow" in r.json()["text"].lower()
        deadline = time.monotonic() + 10  # a streamed response may still be winding down
        while True:
            models = client.get("/api/ps").json()["models"]
            if all(m["in_use"] == 0 for m in models) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert all(m["in_use"] == 0 for m in models), models
    errors = [line for line in fuzz_server.log_lines() if line.get("level") in ("error", "critical")]
    assert not errors, errors[:3]


def test_schema_is_served_as_json(fuzz_server: Server) -> None:
    r = httpx.get(fuzz_server.url + "/docs/openapi.json", timeout=30)
    assert r.status_code == 200
    paths = r.json()["paths"]
    # Every public route is in the schema the fuzz ran on.
    for path in (
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/models/{model_id}",
        "/api/ps/{model_id}",
    ):
        assert path in paths
