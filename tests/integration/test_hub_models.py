"""Any Hugging Face model id works (issue 13), with no network: hub ids resolve from a real HF cache
layout offline (HF_HUB_OFFLINE=1), and the online path runs the real huggingface_hub code against a
stand-in Hub on 127.0.0.1 (HF_ENDPOINT). Real models (the demo files, re-laid as hub repos), real
server, the official openai SDK."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import words
from tests.support.hfcache import add_repo, kokoro_hub_files, whisper_files
from tests.support.hubserver import FakeHub, fake_hub
from tests.support.server import Server, run_server, wait_ready

pytestmark = pytest.mark.slow

DISTIL = "Systran/faster-distil-whisper-large-v3"  # the Speaches guide's model; tiny.en's files here
KOKORO = "test-owner/Kokoro-82M-v1.0-ONNX"  # onnx/model_quantized.onnx + voices/*.bin
NOT_A_MODEL = "test-owner/not-a-model"
COPIES = ("test-owner/whisper-copy-1", "test-owner/whisper-copy-2")
GUIDE_CONFIG = Path(__file__).resolve().parents[1] / "data" / "speaches" / "config.yaml"
ASK_NOT = words("ask not what your country can do for you")
SERIES = re.compile(r'model="([^"]*)"')


def series_models(http: httpx.Client) -> set[str]:
    """Every `model` label value in /metrics."""
    return set(SERIES.findall(http.get("/metrics").text))


def envelope(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return str(error["message"])


def raw(server: Server, method: str, path: str) -> httpx.Response:
    """A request whose path goes out exactly as written (httpx would resolve `..`)."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, headers={"Content-Length": "0"})
        reply = conn.getresponse()
        return httpx.Response(reply.status, headers=reply.getheaders(), content=reply.read())
    finally:
        conn.close()


def has_run(words_: list[str], run: list[str]) -> bool:
    return any(words_[i : i + len(run)] == run for i in range(len(words_)))


@pytest.fixture(scope="module")
def hf_home(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    tiny = whisper_files(models_dir / "faster-whisper-tiny.en")
    add_repo(home, DISTIL, tiny)
    for repo in COPIES:
        add_repo(home, repo, tiny)
    add_repo(home, KOKORO, kokoro_hub_files(models_dir / "kokoro-82m-v1.0-int8"))
    add_repo(home, NOT_A_MODEL, {"README.md": b"# weights", "pytorch_model.bin": b"\0" * 64})
    return home


@pytest.fixture(scope="module")
def empty_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models_dir with nothing in it: every model here comes from the HF cache."""
    return tmp_path_factory.mktemp("no-local-models")


@pytest.fixture(scope="module")
def server(empty_models: Path, hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(empty_models, tmp_path_factory.mktemp("hub-server"), HF_HOME=str(hf_home)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


# ------------------------------------------------------------------------------------- offline


def test_guide_model_id_transcribes_jfk_and_joins_the_catalog(
    client: openai.OpenAI, http: httpx.Client, jfk_flac: Path
) -> None:
    listed = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert DISTIL not in listed  # not listed (no builtin hub models): resolved on demand
    assert DISTIL not in series_models(http)
    text = client.audio.transcriptions.create(model=DISTIL, file=("jfk.flac", jfk_flac.read_bytes())).text
    assert has_run(words(text), ASK_NOT), text
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models[DISTIL]["task"] == "transcription"
    assert models[DISTIL]["source"] == "hf"
    assert models[DISTIL]["loaded"] is True
    metrics = http.get("/metrics").text
    assert f'earshot_model_loaded{{model="{DISTIL}",task="transcription"}} 1.0' in metrics
    assert (
        f'earshot_model_loads_total{{model="{DISTIL}",outcome="success",task="transcription"}} 1.0' in metrics
    )


def test_kokoro_repo_in_the_onnx_and_voices_layout_speaks(client: openai.OpenAI) -> None:
    wav = client.audio.speech.create(
        model=KOKORO, voice="jf_alpha", input="Hello world.", response_format="wav"
    ).content
    assert len(wav) > 24000  # more than half a second of 24 kHz 16-bit audio
    text = client.audio.transcriptions.create(model=DISTIL, file=("speech.wav", wav)).text
    assert {"hello", "world"} <= set(words(text)), text


def test_voices_of_the_hub_kokoro_are_its_voice_files(http: httpx.Client) -> None:
    r = http.get("/v1/audio/voices", params={"model": KOKORO})
    assert r.status_code == 200, r.text
    assert {v["voice"] for v in r.json()["data"]} == {
        "jf_alpha",
        "jf_gongitsune",
        "jf_nezumi",
        "jf_tebukuro",
        "jm_kumo",
    }


def test_id_not_in_the_cache_offline_is_503_naming_the_cause(http: httpx.Client, jfk_flac: Path) -> None:
    before = series_models(http)
    r = http.post(
        "/v1/audio/transcriptions",
        files={"file": ("jfk.flac", jfk_flac.read_bytes())},
        data={"model": "Systran/faster-whisper-not-cached"},
    )
    message = envelope(r, 503, "hub_unreachable")
    assert "not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert series_models(http) == before
    assert "Systran/faster-whisper-not-cached" not in {m["id"] for m in http.get("/v1/models").json()["data"]}


def test_repo_of_other_files_is_400_saying_what_was_found(http: httpx.Client) -> None:
    message = envelope(http.get(f"/v1/models/{NOT_A_MODEL}"), 400, "model_not_servable")
    assert "README.md" in message
    assert "pytorch_model.bin" in message
    assert "model.bin + config.json" in message  # what earshot serves
    assert NOT_A_MODEL not in series_models(http)


@pytest.mark.parametrize("model", ["../x", "a/b/c", "%2F", "x" * 10_240, "owner/" + "n" * 200, "a/.."])
def test_bad_ids_are_refused_and_add_no_series(server: Server, http: httpx.Client, model: str) -> None:
    before = series_models(http)
    r = http.post("/v1/audio/transcriptions", files={"file": ("c.wav", b"RIFF")}, data={"model": model})
    envelope(r, 404, "model_not_found")
    r = http.post("/v1/audio/speech", json={"model": model, "input": "hi", "voice": "jf_alpha"})
    envelope(r, 404, "model_not_found")
    path = raw(server, "GET", "/v1/models/" + model)
    if path.status_code == 200:  # `/v1/models/%2F` is the listing route, `/v1/models//`
        assert path.json()["object"] == "list"
    else:
        assert path.status_code in (400, 404), path.text[:300]
    assert series_models(http) == before
    assert not any(m["id"] == model for m in http.get("/v1/models").json()["data"])


def test_server_keeps_serving(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ok"


# --------------------------------------------------------------------------------- bounds, switch


def test_max_catalog_models_refuses_the_next_id_and_adds_no_series(
    empty_models: Path, hf_home: Path, tmp_path: Path
) -> None:
    with (
        run_server(empty_models, tmp_path, HF_HOME=str(hf_home), max_catalog_models=2) as srv,
        srv.client() as http,
    ):
        # a failed lookup holds no slot
        envelope(http.get("/v1/models/Systran/faster-whisper-not-cached"), 503, "hub_unreachable")
        for repo in COPIES:
            r = http.get(f"/v1/models/{repo}")
            assert r.status_code == 200, r.text
            assert r.json()["task"] == "transcription"
        message = envelope(http.get(f"/v1/models/{DISTIL}"), 403, "catalog_full")
        assert "max_catalog_models" in message
        again = envelope(http.post(f"/api/ps/{DISTIL}"), 403, "catalog_full")
        assert again == message
        models = series_models(http)
        assert set(COPIES) <= models
        assert DISTIL not in models
        assert DISTIL not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        # the ids already added keep working
        assert http.get(f"/v1/models/{COPIES[0]}").status_code == 200


def test_allow_hub_models_false_refuses_with_a_clear_message(
    empty_models: Path, hf_home: Path, tmp_path: Path, jfk_flac: Path
) -> None:
    with (
        run_server(empty_models, tmp_path, HF_HOME=str(hf_home), allow_hub_models=False) as srv,
        srv.client() as http,
    ):
        r = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("jfk.flac", jfk_flac.read_bytes())},
            data={"model": DISTIL},
        )
        message = envelope(r, 403, "hub_models_disabled")
        assert "allow_hub_models=false" in message
        assert DISTIL not in series_models(http)


# -------------------------------------------------------------------------------------- preload


def test_guide_config_preloads_the_hub_model(
    empty_models: Path, hf_home: Path, tmp_path: Path, jfk_flac: Path
) -> None:
    guide = yaml.safe_load(GUIDE_CONFIG.read_text())
    assert DISTIL in guide["model_management"]["preload_models"]
    # the guide's file, plus an id that cannot resolve offline: logged, skipped, the server starts
    guide["model_management"]["preload_models"].append("Systran/faster-whisper-not-cached")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(guide))
    with (
        run_server(empty_models, tmp_path / "logs", HF_HOME=str(hf_home), EARSHOT_CONFIG=str(config)) as srv,
        srv.client() as http,
    ):
        wait_ready(srv, timeout=300)
        ps = {m["model"]: m for m in http.get("/api/ps").json()["models"]}
        assert ps[DISTIL]["loaded"] is True
        assert ps[DISTIL]["pinned"] is True  # pin_preloaded
        skipped = [
            line
            for line in srv.log_lines()
            if "preload_models" in str(line.get("event", "")) and "not-cached" in str(line.get("event", ""))
        ]
        assert skipped, "the unresolvable preload id is not logged"
        r = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("jfk.flac", jfk_flac.read_bytes())},
            data={"model": DISTIL},
        )
        assert has_run(words(r.json()["text"]), ASK_NOT)


# --------------------------------------------------------------------------------------- online


@pytest.fixture(scope="module")
def hub(models_dir: Path) -> Iterator[FakeHub]:
    tiny = whisper_files(models_dir / "faster-whisper-tiny.en")
    repos: dict[str, Any] = {
        "remote-owner/whisper-ct2": {
            **tiny,
            "pytorch_model.bin": b"\0" * 4096,  # another format's weights: never downloaded
            "README.md": b"# a CTranslate2 conversion",
        },
        "remote-owner/just-a-readme": {"README.md": b"nothing to serve"},
    }
    with fake_hub(repos) as fake:
        yield fake


def test_online_file_list_then_download_then_load(
    hub: FakeHub, empty_models: Path, tmp_path: Path, jfk_flac: Path
) -> None:
    repo = "remote-owner/whisper-ct2"
    with (
        run_server(
            empty_models,
            tmp_path / "logs",
            HF_HOME=str(tmp_path / "hf"),
            HF_HUB_OFFLINE="0",
            HF_ENDPOINT=hub.url,
            HF_HUB_DISABLE_TELEMETRY="1",
        ) as srv,
        srv.client() as http,
    ):
        # resolution reads the file list only: no file is downloaded to decide the task
        r = http.get(f"/v1/models/{repo}")
        assert r.status_code == 200, r.text
        assert r.json()["task"] == "transcription"
        assert hub.resolved(repo) == []
        # unknown repo: 404 from the Hub's own answer; a repo of other files: 400
        envelope(http.get("/v1/models/remote-owner/no-such-repo"), 404, "model_not_found")
        envelope(http.get("/v1/models/remote-owner/just-a-readme"), 400, "model_not_servable")
        # the first use downloads the needed files (huggingface_hub's progress in the log), then loads
        r = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("jfk.flac", jfk_flac.read_bytes())},
            data={"model": repo},
        )
        assert r.status_code == 200, r.text
        assert has_run(words(r.json()["text"]), ASK_NOT)
        fetched = set(hub.resolved(repo))
        assert {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"} <= fetched
        assert "pytorch_model.bin" not in fetched
        assert "README.md" not in fetched
        deadline = time.monotonic() + 30
        while True:
            progress = [
                line for line in srv.log_lines() if str(line.get("event", "")).startswith(f"download {repo}:")
            ]
            if progress or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert progress, "no download progress in the log"
        assert any("100%" in str(line["event"]) for line in progress)
        snapshots = list(
            (tmp_path / "hf" / "hub").glob("models--remote-owner--whisper-ct2/snapshots/*/model.bin")
        )
        assert snapshots, "not downloaded into the standard HF cache"
