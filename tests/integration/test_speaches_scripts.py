"""The Speaches guide's operator scripts run against earshot unchanged but for the host:
startup.sh preloads with POST /v1/models/{id}, monitor_models.py lists `loaded` models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.server import Server

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[1] / "data" / "speaches"
PRELOAD = ["faster-whisper-tiny.en", "kokoro-82m-v1.0-int8"]


def test_startup_sh_preloads_and_monitor_lists_them(server: Server) -> None:
    env = {**os.environ, "BASE_URL": server.url}
    with server.client() as http:
        for model in PRELOAD:
            http.delete(f"/api/ps/{model}")  # start cold (404 when it was not loaded: fine)
        before = subprocess.run(
            [sys.executable, str(SCRIPTS / "monitor_models.py"), "--once"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert not any(m in before for m in PRELOAD), before

        run = subprocess.run(
            ["bash", str(SCRIPTS / "startup.sh"), *PRELOAD],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "All models preloaded" in run.stdout
        loaded = {m["model"] for m in http.get("/api/ps").json()["models"] if m["loaded"]}
        assert set(PRELOAD) <= loaded

    after = subprocess.run(
        [sys.executable, str(SCRIPTS / "monitor_models.py"), "--once"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    listed = after.split("loaded: ", 1)[1].strip().split(", ")
    assert set(PRELOAD) <= set(listed), after


def test_startup_sh_fails_loudly_for_an_unknown_model(server: Server) -> None:
    run = subprocess.run(
        ["bash", str(SCRIPTS / "startup.sh"), "no-such-model"],
        env={**os.environ, "BASE_URL": server.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "All models preloaded" not in run.stdout
