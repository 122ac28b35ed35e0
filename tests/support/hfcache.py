"""A real Hugging Face cache layout (what huggingface_hub itself writes) made from the demo models'
files, so hub ids resolve and load offline: HF_HOME/hub/models--owner--name/{blobs,snapshots,refs}."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def commit_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


def add_repo(hf_home: Path, repo_id: str, files: Mapping[str, Path | bytes]) -> Path:
    """Put `files` (repo path -> a file to link, or bytes) in the cache as `repo_id` at one commit,
    with refs/main pointing at it; returns the snapshot directory."""
    owner, name = repo_id.split("/")
    repo = hf_home / "hub" / f"models--{owner}--{name}"
    commit = commit_of(repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for rel, content in files.items():
        key = hashlib.sha256(f"{repo_id}/{rel}".encode()).hexdigest()
        blob = repo / "blobs" / key
        if not blob.exists():
            if isinstance(content, bytes):
                blob.write_bytes(content)
            else:
                blob.symlink_to(content.resolve())  # the demo file itself: no 75 MB copy
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def whisper_files(model_dir: Path) -> dict[str, Path | bytes]:
    return {p.name: p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")}


def kokoro_hub_files(model_dir: Path) -> dict[str, Path | bytes]:
    """The demo Kokoro model in the layout of the Hub's ONNX exports: onnx/model*.onnx and one raw
    float32 file per voice in voices/."""
    onnx = next(model_dir.glob("*.onnx"))
    out: dict[str, Path | bytes] = {"onnx/model_quantized.onnx": onnx, "config.json": b"{}"}
    with np.load(model_dir / "voices.npz") as npz:
        for voice in npz.files:
            out[f"voices/{voice}.bin"] = np.asarray(npz[voice], dtype="<f4").tobytes()
    return out
