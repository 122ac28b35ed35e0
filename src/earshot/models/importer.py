"""`earshot models import PATH [--id ID] [--link]`: put a model directory from elsewhere (an air-gapped
copy, an HF cache snapshot, a conversion of one's own) under `models_dir`, where discovery finds it.

The directory is checked with the same file rules as discovery and hub repos (earshot.models.files);
the id is checked like every local id (`safe_model_dir`: one name, nothing that escapes models_dir).
A copy is written under a hidden name first (discovery skips hidden directories) and renamed when
complete. `--link` makes a real directory whose files link to the originals (a directory link out of
models_dir would be refused by discovery).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from earshot.models.catalog import UnsafeModelId, safe_model_dir
from earshot.models.files import SERVABLE, describe, list_dir, task_from_files
from earshot.types import Task


class ModelImportError(Exception):
    """The directory cannot be imported; the message says why."""


@dataclass(frozen=True)
class Imported:
    id: str
    task: Task
    path: Path
    files: int
    linked: bool


def import_model(
    source: Path, models_dir: Path, *, model_id: str | None = None, link: bool = False
) -> Imported:
    source = source.expanduser()
    if not source.is_dir():
        raise ModelImportError(f"{source} is not a directory")
    files = list_dir(source)
    task = task_from_files(files)
    if task is None:
        raise ModelImportError(f"{source} holds {describe(files)}; earshot serves {SERVABLE}")
    name = model_id or source.resolve().name
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        dest = safe_model_dir(models_dir, name)
    except UnsafeModelId as exc:
        raise ModelImportError(f"{exc}; choose another with --id") from exc
    if dest.exists() or dest.is_symlink():
        raise ModelImportError(f"{dest} exists already; choose another id with --id, or remove it")
    staging = dest.with_name(f".{dest.name}.importing")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for rel in files:
            src = source / rel
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if link:
                target.symlink_to(src.resolve())
            else:
                shutil.copyfile(src, target)  # follows links (HF snapshots link into blobs/)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Imported(id=name, task=task, path=dest, files=len(files), linked=link)
