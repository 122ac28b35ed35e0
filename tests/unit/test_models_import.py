"""`earshot models import PATH [--id ID] [--link]` and `earshot models list` with hub ids from the
local HF cache; the Kokoro backend's reading of a voices/ directory of per-voice files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from earshot.backends.kokoro import _read_voices
from earshot.cli import main
from earshot.models.catalog import build_catalog
from earshot.models.importer import ModelImportError, import_model
from tests.support.hfcache import add_repo, kokoro_hub_files, whisper_files

TINY = "faster-whisper-tiny.en"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("EARSHOT_", "SPEACHES_")):
            monkeypatch.delenv(name)


def test_import_copies_a_model_and_discovery_finds_it(models_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    done = import_model(models_dir / TINY, dest, model_id="my-whisper")
    assert done.task.value == "transcription"
    assert (dest / "my-whisper" / "model.bin").is_file()
    assert not (dest / "my-whisper" / "model.bin").is_symlink()
    assert (dest / "my-whisper" / "model.bin").stat().st_size == (
        models_dir / TINY / "model.bin"
    ).stat().st_size
    spec = build_catalog(models_dir=dest, builtin_hub_models=False).resolve("my-whisper")
    assert spec is not None
    assert spec.source == "local"
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_import_link_makes_a_directory_of_links(models_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    import_model(models_dir / TINY, dest, link=True)
    made = dest / TINY
    assert made.is_dir()
    assert not made.is_symlink()
    assert (made / "model.bin").is_symlink()
    assert (made / "model.bin").resolve() == (models_dir / TINY / "model.bin").resolve()
    assert build_catalog(models_dir=dest, builtin_hub_models=False).resolve(TINY) is not None


def test_import_of_an_hf_snapshot_in_the_hub_layout(models_dir: Path, tmp_path: Path) -> None:
    snapshot = add_repo(tmp_path / "hf", "o/kokoro", kokoro_hub_files(models_dir / "kokoro-82m-v1.0-int8"))
    done = import_model(snapshot, tmp_path / "models", model_id="kokoro-hub")
    assert done.task.value == "speech"
    assert (tmp_path / "models" / "kokoro-hub" / "voices" / "jf_alpha.bin").is_file()


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "..", "/abs", "x" * 300, ".hidden"])
def test_import_refuses_ids_that_escape_models_dir(models_dir: Path, tmp_path: Path, bad_id: str) -> None:
    dest = tmp_path / "models"
    with pytest.raises(ModelImportError):
        import_model(models_dir / TINY, dest, model_id=bad_id)
    assert not (tmp_path / "escape").exists()
    assert not any(dest.iterdir())


def test_import_refuses_what_is_not_a_model_and_says_what_it_found(tmp_path: Path) -> None:
    src = tmp_path / "weights"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelImportError) as info:
        import_model(src, tmp_path / "models")
    assert "pytorch_model.bin" in str(info.value)
    assert "model.bin + config.json" in str(info.value)


def test_import_refuses_to_overwrite(models_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    import_model(models_dir / TINY, dest, link=True)
    with pytest.raises(ModelImportError, match="exists already"):
        import_model(models_dir / TINY, dest, link=True)


def test_cli_import(models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "m"
    argv = ["models", "import", str(models_dir / TINY), "--id", "w", "--link", "--models-dir", str(dest)]
    assert main(argv) == 0
    assert "imported w (transcription)" in capsys.readouterr().out
    assert main(["models", "import", str(models_dir / TINY), "--id", "../w", "--models-dir", str(dest)]) == 2
    assert "not a valid local model id" in capsys.readouterr().err


def test_models_list_shows_hub_ids_resolved_from_the_hf_cache(models_dir: Path, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    add_repo(hf, "Systran/faster-distil-whisper-large-v3", whisper_files(models_dir / TINY))
    add_repo(hf, "o/kokoro-export", kokoro_hub_files(models_dir / "kokoro-82m-v1.0-int8"))
    add_repo(hf, "o/readme-only", {"README.md": b"hi"})
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EARSHOT_", "SPEACHES_"))},
        "HF_HOME": str(hf),
        "HF_HUB_OFFLINE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-m", "earshot.cli", "models", "list", "--no-builtin-hub-models"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert rows["Systran/faster-distil-whisper-large-v3"][:2] == ["transcription", "hf"]
    assert rows["o/kokoro-export"][:2] == ["speech", "hf"]
    assert "o/readme-only" not in rows


def test_kokoro_reads_a_directory_of_per_voice_files(models_dir: Path, tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    voices.mkdir()
    with np.load(models_dir / "kokoro-82m-v1.0-int8" / "voices.npz") as npz:
        want = {name: np.asarray(npz[name], dtype=np.float32) for name in npz.files}
    for name, style in want.items():
        style.astype("<f4").tofile(voices / f"{name}.bin")
    got = _read_voices(voices)
    assert set(got) == set(want)
    for name, style in want.items():
        assert got[name].shape == style.shape
        assert np.array_equal(got[name], style)
    (voices / "broken.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="not a Kokoro voice"):
        _read_voices(voices)
