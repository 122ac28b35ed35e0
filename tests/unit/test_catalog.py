"""The model catalog: discovery by files, config entries, hub models, aliases, and path-escape ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from earshot.cache.protocol import Task
from earshot.models.catalog import UnsafeModelId, build_catalog, detect_task, safe_model_dir
from earshot.settings import ModelEntry
from tests.conftest import DEMO_MODELS


def layout(root: Path, name: str, files: list[str]) -> Path:
    """A directory with the given file names (for discovery rules only; nothing here is loaded)."""
    d = root / name
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_bytes(b"x" * 10)
    return d


def test_demo_models_are_discovered_with_their_tasks(models_dir: Path) -> None:
    catalog = build_catalog(models_dir=models_dir, builtin_hub_models=False)
    assert set(DEMO_MODELS) <= set(catalog.specs)
    assert catalog.specs["faster-whisper-tiny.en"].task == Task.TRANSCRIPTION
    assert catalog.specs["faster-whisper-base"].task == Task.TRANSCRIPTION
    kokoro = catalog.specs["kokoro-82m-v1.0-int8"]
    assert kokoro.task == Task.SPEECH
    assert kokoro.source == "local"
    assert kokoro.path == (models_dir / "kokoro-82m-v1.0-int8").resolve()
    # the estimate is the size of the files: the int8 ONNX alone is about 90 MB
    assert kokoro.size_bytes > 80_000_000


def test_discovery_rules(tmp_path: Path) -> None:
    layout(tmp_path, "stt", ["model.bin", "config.json", "tokenizer.json"])
    layout(tmp_path, "tts", ["kokoro.onnx", "voices-v1.0.bin"])
    layout(tmp_path, "tts-npz", ["model.onnx", "voices.npz"])
    layout(tmp_path, "half-stt", ["model.bin"])  # no config.json: not a model
    layout(tmp_path, "onnx-only", ["model.onnx"])  # no voices: not a model
    layout(tmp_path, ".partial", ["model.bin", "config.json"])  # hidden (a build in progress)
    (tmp_path / "stray-file.bin").write_bytes(b"x")
    catalog = build_catalog(models_dir=tmp_path, builtin_hub_models=False)
    assert sorted(catalog.specs) == ["stt", "tts", "tts-npz"]
    assert catalog.specs["tts"].task == Task.SPEECH
    assert detect_task(tmp_path / "half-stt") is None


def test_missing_models_dir_is_an_empty_catalog(tmp_path: Path) -> None:
    assert build_catalog(models_dir=tmp_path / "absent", builtin_hub_models=False).specs == {}


def test_builtin_hub_models(tmp_path: Path) -> None:
    catalog = build_catalog(models_dir=tmp_path, builtin_hub_models=True)
    spec = catalog.resolve("Systran/faster-whisper-base")
    assert spec is not None
    assert spec.source == "hf"
    assert spec.repo_id == "Systran/faster-whisper-base"
    assert spec.path is None
    assert catalog.resolve("speaches-ai/Kokoro-82M-v1.0-ONNX").task == Task.SPEECH  # type: ignore[union-attr]


def test_config_entries_path_and_repo(tmp_path: Path) -> None:
    d = layout(tmp_path / "elsewhere", "my-whisper", ["model.bin", "config.json"])
    entries = [
        ModelEntry(id="team/stt", path=d, pin=True, idle_timeout=-1),
        ModelEntry(id="small", repo="Systran/faster-whisper-small"),
        ModelEntry(id="voice", repo="someone/custom-tts", task=Task.SPEECH),
    ]
    catalog = build_catalog(models_dir=tmp_path / "models", entries=entries, builtin_hub_models=False)
    stt = catalog.resolve("team/stt")
    assert stt is not None
    assert stt.path == d.resolve()
    assert stt.pin
    assert stt.idle_timeout == -1
    assert stt.task == Task.TRANSCRIPTION
    assert stt.source == "config"
    assert catalog.resolve("small").repo_id == "Systran/faster-whisper-small"  # type: ignore[union-attr]
    assert catalog.resolve("voice").task == Task.SPEECH  # type: ignore[union-attr]


def test_config_entry_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of `path` or `repo`"):
        ModelEntry(id="x")
    with pytest.raises(ValueError, match="is not a directory"):
        build_catalog(models_dir=tmp_path, entries=[ModelEntry(id="x", path=tmp_path / "nope")])
    with pytest.raises(ValueError, match="cannot tell the task"):
        build_catalog(models_dir=tmp_path, entries=[ModelEntry(id="x", repo="someone/mystery")])


def test_default_aliases_point_at_the_demo_models(models_dir: Path) -> None:
    catalog = build_catalog(models_dir=models_dir, builtin_hub_models=False)
    assert catalog.aliases["whisper-1"] == "faster-whisper-base"
    assert catalog.aliases["tts-1"] == "kokoro-82m-v1.0-int8"
    assert catalog.aliases["tts-1-hd"] == "kokoro-82m-v1.0-int8"
    assert catalog.resolve("whisper-1") is catalog.specs["faster-whisper-base"]


def test_alias_falls_back_to_the_next_choice_and_never_shadows_an_id(tmp_path: Path) -> None:
    layout(tmp_path, "stt", ["model.bin", "config.json"])
    layout(tmp_path, "whisper-1", ["model.bin", "config.json"])
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"whisper-1": "stt", "fast": ["missing", "stt"], "gone": "nothing"}))
    catalog = build_catalog(models_dir=tmp_path, aliases_file=aliases, builtin_hub_models=False)
    assert catalog.resolve("whisper-1").id == "whisper-1"  # type: ignore[union-attr]
    assert catalog.aliases == {"fast": "stt"}


def test_close_matches_for_a_typo(models_dir: Path) -> None:
    catalog = build_catalog(models_dir=models_dir, builtin_hub_models=False)
    assert "faster-whisper-tiny.en" in catalog.close_matches("faster-whisper-tiny")


@pytest.mark.parametrize(
    "bad",
    [
        "../etc",
        "..",
        ".",
        "/etc/passwd",
        "a/../../b",
        "sub/dir",
        "foo\x00bar",
        "..%2F..%2Fetc",
        "x" * 300,
        "",
        "~root",
        "faster-whisper-base/../../x",
        "C:\\windows",
    ],
)
def test_path_escape_ids_are_rejected(tmp_path: Path, models_dir: Path, bad: str) -> None:
    with pytest.raises(UnsafeModelId):
        safe_model_dir(tmp_path, bad)
    catalog = build_catalog(models_dir=models_dir, builtin_hub_models=False)
    assert catalog.resolve(bad) is None


def test_safe_model_dir_accepts_plain_names(tmp_path: Path) -> None:
    assert (
        safe_model_dir(tmp_path, "faster-whisper-tiny.en") == (tmp_path / "faster-whisper-tiny.en").resolve()
    )


def test_symlink_escaping_models_dir_is_rejected(tmp_path: Path) -> None:
    outside = layout(tmp_path / "outside", "real", ["model.bin", "config.json"])
    models = tmp_path / "models"
    models.mkdir()
    (models / "sneaky").symlink_to(outside)
    with pytest.raises(UnsafeModelId):
        safe_model_dir(models, "sneaky")
    assert "sneaky" not in build_catalog(models_dir=models, builtin_hub_models=False).specs
