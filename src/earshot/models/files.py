"""What a model's files are: one set of rules for a directory on disk, a Hugging Face repo's file list,
and a directory being imported.

- faster-whisper (CTranslate2): `model.bin` + `config.json` at the top level.
- Kokoro (ONNX): an `.onnx` at the top level or in `onnx/` (the layout of the Hub's ONNX exports,
  e.g. `onnx/model.onnx`, `onnx/model_quantized.onnx`), plus voices: a `voices*.npz` / `voices*.bin`
  file at the top level, or a `voices/` directory of per-voice `.bin` files (`voices/af_heart.bin`).

Paths are relative, `/`-separated (as the Hub lists them).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from earshot.types import Task

VOICE_FILE_PATTERNS = ("voices*.npz", "voices*.bin")
# What faster-whisper itself downloads of a CTranslate2 repo (faster_whisper.utils.download_model).
WHISPER_PATTERNS = ("config.json", "preprocessor_config.json", "model.bin", "tokenizer.json", "vocabulary.*")
# Preferred ONNX file names, best first, when a repo holds several exports of the same model.
ONNX_PREFERRED = ("model.onnx", "kokoro-v1.0.onnx", "model_quantized.onnx", "kokoro-v1.0.int8.onnx")
SERVABLE = (
    "faster-whisper / CTranslate2 (model.bin + config.json) for transcription, or Kokoro ONNX "
    "(an .onnx, top level or onnx/, plus voices*.npz|bin or voices/*.bin) for speech"
)


@dataclass(frozen=True)
class KokoroFiles:
    onnx: tuple[str, ...]
    voice_files: tuple[str, ...]  # top-level voices*.npz / voices*.bin
    voice_dir: tuple[str, ...]  # voices/<name>.bin

    @property
    def complete(self) -> bool:
        return bool(self.onnx) and bool(self.voice_files or self.voice_dir)


def _split(path: str) -> tuple[str, str]:
    head, _, name = path.rpartition("/")
    return head, name


def kokoro_files(paths: Iterable[str]) -> KokoroFiles:
    onnx: list[str] = []
    voice_files: list[str] = []
    voice_dir: list[str] = []
    for path in paths:
        folder, name = _split(path)
        if folder in ("", "onnx") and name.endswith(".onnx"):
            onnx.append(path)
        elif folder == "" and any(fnmatch.fnmatchcase(name, p) for p in VOICE_FILE_PATTERNS):
            voice_files.append(path)
        elif folder == "voices" and name.endswith(".bin"):
            voice_dir.append(path)
    return KokoroFiles(tuple(sorted(onnx)), tuple(sorted(voice_files)), tuple(sorted(voice_dir)))


def task_from_files(paths: Iterable[str]) -> Task | None:
    """The task of a model made of these files, or None when earshot cannot serve them."""
    names = list(paths)
    top = {p for p in names if "/" not in p}
    if {"model.bin", "config.json"} <= top:
        return Task.TRANSCRIPTION
    if kokoro_files(names).complete:
        return Task.SPEECH
    return None


def pick_onnx(candidates: Iterable[str]) -> str | None:
    """The ONNX file to use among several (by preferred name, top level first), or the only one."""
    found = sorted(candidates, key=lambda p: (p.count("/"), p))
    if len(found) <= 1:
        return found[0] if found else None
    for name in ONNX_PREFERRED:
        for path in found:
            if _split(path)[1] == name:
                return path
    return found[0]


def list_dir(directory: Path, *, max_files: int = 10_000) -> list[str]:
    """Relative paths of the files in `directory` and in its direct sub-directories (at most
    `max_files`); what the rules above look at."""
    out: list[str] = []
    if not directory.is_dir():
        return out
    for child in sorted(directory.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file():
            out.append(child.name)
        elif child.is_dir():
            out.extend(f"{child.name}/{g.name}" for g in sorted(child.iterdir()) if g.is_file())
        if len(out) >= max_files:
            break
    return out[:max_files]


def describe(paths: Iterable[str], limit: int = 8) -> str:
    names = sorted(paths)
    if not names:
        return "no files"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def download_patterns(task: Task, options: Mapping[str, Any]) -> list[str]:
    """`allow_patterns` for huggingface_hub: only the files `load` needs (never a repo's other
    weights, e.g. the PyTorch checkpoint next to a CTranslate2 conversion)."""
    if task == Task.TRANSCRIPTION:
        return list(WHISPER_PATTERNS)
    onnx = options.get("onnx_file")
    return [str(onnx) if onnx else "*.onnx", *VOICE_FILE_PATTERNS, "voices/*.bin", "config.json"]


def needed_files(task: Task, paths: Iterable[str], options: Mapping[str, Any]) -> list[str]:
    """The files of `paths` that `download_patterns` selects."""
    patterns = download_patterns(task, options)
    return [p for p in paths if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]


def hub_options(task: Task, paths: Iterable[str]) -> dict[str, Any]:
    """Per-model options a hub repo's layout needs (the ONNX file to use when there are several or
    it is not at the top level), so only that one is downloaded."""
    if task != Task.SPEECH:
        return {}
    files = kokoro_files(paths)
    chosen = pick_onnx(files.onnx)
    if chosen is None or (len(files.onnx) == 1 and "/" not in chosen):
        return {}
    return {"onnx_file": chosen}


def dir_size(path: Path) -> int:
    """Total size of the regular files under `path`, subdirectories included (symlinks followed: HF
    snapshots link to blobs); 0 for what cannot be read. The footprint estimate of a local model."""
    total = 0
    try:
        entries = list(path.rglob("*"))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:
            continue
    return total
