"""GET /v1/audio/voices reads voices from the models' files: a listing never loads (or evicts) a model;
neither does a speech request for a voice the model does not have (checked against the same files)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import Server, run_server

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
KOKORO = "kokoro-82m-v1.0-int8"
VOICES = ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]


@pytest.fixture(scope="module")
def one_model(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(models_dir, tmp_path_factory.mktemp("voices"), max_models=1) as srv:
        yield srv


def test_listing_voices_loads_no_model(one_model: Server) -> None:
    with one_model.client() as http:
        assert http.post(f"/api/ps/{TINY}").status_code == 200
        every = http.get("/v1/audio/voices")
        one = http.get("/v1/audio/voices", params={"model": KOKORO})
        ps = http.get("/api/ps").json()
        metrics = http.get("/metrics").text
    assert every.status_code == 200
    assert one.status_code == 200
    assert [v["voice"] for v in every.json()["data"] if v["model"] == KOKORO] == VOICES
    assert [v["voice"] for v in one.json()["data"]] == VOICES
    # under max_models=1 a load of Kokoro would have evicted tiny.en
    assert [m["model"] for m in ps["models"]] == [TINY]
    assert not re.search(
        rf'earshot_model_loads_total{{model="{KOKORO}",outcome="success"[^}}]*}} [1-9]', metrics
    )
    assert f'earshot_model_evictions_total{{model="{TINY}",reason="capacity"}} 0.0' in metrics


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_voice_is_400_before_any_load(one_model: Server, stream: bool) -> None:
    with one_model.client() as http:
        assert http.post(f"/api/ps/{TINY}").status_code == 200
        body: dict[str, object] = {"model": KOKORO, "input": "Hello.", "voice": "nobody"}
        if stream:
            body["stream"] = True
        r = http.post("/v1/audio/speech", json=body)
        ps = http.get("/api/ps").json()
        metrics = http.get("/metrics").text
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_voice", "voice")
    assert "jf_alpha" in error["message"]  # the voices it has, from the files
    assert [m["model"] for m in ps["models"]] == [TINY]
    assert not re.search(
        rf'earshot_model_loads_total{{model="{KOKORO}",outcome="success"[^}}]*}} [1-9]', metrics
    )
