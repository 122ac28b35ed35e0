"""The `earshot` command: settings flags, `config`, `models list`, and start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from earshot.cli import main
from earshot.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("EARSHOT_", "SPEACHES_")):
            monkeypatch.delenv(name)


def test_config_shows_values_and_sources(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEACHES_MODEL_IDLE_TIMEOUT", "21600")
    monkeypatch.setenv("EARSHOT_API_KEY", "secret-key")
    assert main(["config", "--json", "--max-models", "5"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_models"] == {"value": 5, "source": "command-line flag --max-models"}
    assert shown["model_idle_timeout"] == {
        "value": 21600.0,
        "source": "environment variable SPEACHES_MODEL_IDLE_TIMEOUT",
    }
    assert shown["api_key"]["value"] == "**********"
    assert shown["port"] == {"value": 8000, "source": "default"}


def test_config_text_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--preload-models", "a,b", "--no-pin-preloaded"]) == 0
    lines = {line.split()[0]: " ".join(line.split()[1:]) for line in capsys.readouterr().out.splitlines()}
    assert lines["preload_models"] == '["a", "b"] [command-line flag --preload-models]'
    assert lines["pin_preloaded"] == "false [command-line flag --pin-preloaded]"
    assert lines["max_models"] == "null [default]"
    assert set(lines) == set(Settings.model_fields)


def test_config_yaml_from_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("model_management:\n  max_models: 3\n")
    assert main(["config", "--json", "--config", str(tmp_path / "c.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["max_models"]["value"] == 3


def test_bad_value_stops_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEACHES_MAX_MODELS", "-2")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "earshot: invalid setting max_models='-2' (from environment variable SPEACHES_MAX_MODELS): "
        "Input should be greater than or equal to 1\n"
    )


def test_serve_refuses_a_bad_flag_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model-idle-timeout", "abc"]) == 2
    assert (
        "invalid setting model_idle_timeout='abc' (from command-line flag --model-idle-timeout)"
        in capsys.readouterr().err
    )


def test_models_list(capsys: pytest.CaptureFixture[str], models_dir: Path) -> None:
    assert main(["models", "list", "--json", "--models-dir", str(models_dir), "--no-builtin-hub-models"]) == 0
    listed = json.loads(capsys.readouterr().out)
    ids = {m["id"]: m["task"] for m in listed["models"]}
    assert ids == {
        "faster-whisper-base": "transcription",
        "faster-whisper-tiny.en": "transcription",
        "kokoro-82m-v1.0-int8": "speech",
    }
    assert listed["aliases"]["whisper-1"] == "faster-whisper-base"


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("earshot")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("earshot ")
