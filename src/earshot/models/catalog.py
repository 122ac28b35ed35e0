"""The model catalog: every model earshot can serve, by id, and the aliases clients may use.

Sources, merged in this order (a later source never replaces an earlier id):
  1. entries of config.yaml `models:` (an explicit local path, or a Hugging Face repo);
  2. directories under `models_dir`, recognised by their files (faster-whisper: model.bin +
     config.json; Kokoro: *.onnx + a voices file); the id is the directory name;
  3. well-known Hugging Face repos (`builtin_hub_models`), fetched on first use;
  4. at run time, hub repos resolved on demand (`earshot.models.resolver`), added with `add()`.

Client input is only ever looked up in this catalog: an id never becomes a file path. Directory
names found on disk are checked too (`safe_model_dir`), so nothing resolves outside models_dir.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from earshot.models.files import VOICE_FILE_PATTERNS, dir_size, list_dir, task_from_files
from earshot.models.hub import KNOWN_HUB_MODELS, KNOWN_HUB_OPTIONS, cached_repo_sizes
from earshot.types import ModelSpec, Task

log = logging.getLogger("earshot.models")

# A local model id is one path component of these characters (no separators, no "..").
_LOCAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
__all__ = [
    "VOICE_FILE_PATTERNS",
    "Catalog",
    "UnsafeModelId",
    "build_catalog",
    "detect_task",
    "safe_model_dir",
]


class UnsafeModelId(ValueError):
    """A model id that would escape models_dir (`..`, separators, absolute paths, NUL, ...)."""


def safe_model_dir(models_dir: Path, model_id: str) -> Path:
    """The directory of local model `model_id` under `models_dir`, refusing any escape."""
    if not _LOCAL_ID.fullmatch(model_id) or ".." in model_id:
        raise UnsafeModelId(
            f"{model_id!r} is not a valid local model id (one name of letters, digits, . _ -)"
        )
    root = models_dir.resolve()
    path = (root / model_id).resolve()
    if path.parent != root:
        raise UnsafeModelId(f"{model_id!r} resolves outside the models directory")
    return path


def detect_task(directory: Path) -> Task | None:
    """What the files in `directory` are: a faster-whisper model, a Kokoro model, or neither (the
    rules of `earshot.models.files`, the same for hub repos)."""
    return task_from_files(list_dir(directory))


def task_from_repo(repo: str) -> Task | None:
    name = repo.lower()
    if "whisper" in name:
        return Task.TRANSCRIPTION
    if "kokoro" in name:
        return Task.SPEECH
    return None


class Catalog:
    """Models by canonical id, and aliases (public names) to canonical ids.

    Built at start-up; hub models resolved on demand join it later with `add()` (on the event loop,
    like every read of it). `on_add` callbacks (metric series) hear of each added model."""

    def __init__(self, specs: Mapping[str, ModelSpec], aliases: Mapping[str, str] | None = None) -> None:
        self._specs: dict[str, ModelSpec] = dict(specs)
        self.aliases: Mapping[str, str] = dict(aliases or {})
        self._listeners: list[Callable[[ModelSpec], None]] = []
        self.added: list[str] = []  # ids added at run time, in order

    @property
    def specs(self) -> Mapping[str, ModelSpec]:
        return MappingProxyType(self._specs)

    def resolve(self, name: str) -> ModelSpec | None:
        """The model a client's name means (an id or an alias), or None. Never touches the disk."""
        spec = self._specs.get(name)
        if spec is None and name in self.aliases:
            spec = self._specs.get(self.aliases[name])
        return spec

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) is not None

    def ids(self, task: Task | None = None) -> list[str]:
        return sorted(i for i, s in self._specs.items() if task is None or s.task == task)

    def close_matches(self, name: str, n: int = 3) -> list[str]:
        """Known ids and aliases that look like `name`, for a helpful 404."""
        candidates = [*self._specs, *self.aliases]
        return difflib.get_close_matches(name[:200], candidates, n=n, cutoff=0.5)

    def add(self, spec: ModelSpec) -> ModelSpec:
        """Add a model found at run time (a hub repo resolved on demand); the one already listed
        under that id wins. Listeners are told of a model really added."""
        existing = self.resolve(spec.id)
        if existing is not None:
            return existing
        self._specs[spec.id] = spec
        self.added.append(spec.id)
        for listener in list(self._listeners):
            listener(spec)
        return spec

    def on_add(self, listener: Callable[[ModelSpec], None]) -> None:
        """Call `listener(spec)` for every model added from now on."""
        self._listeners.append(listener)


def _config_specs(entries: Iterable[Any], hub_sizes: Mapping[str, int]) -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for entry in entries:
        if entry.id in specs:
            raise ValueError(f"model {entry.id!r} is declared twice in config.yaml `models:`")
        if entry.path is not None:
            path = Path(entry.path).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"model {entry.id!r}: path {path} is not a directory")
            task = entry.task or detect_task(path)
            if task is None:
                raise ValueError(
                    f"model {entry.id!r}: no faster-whisper (model.bin + config.json) or Kokoro "
                    f"(*.onnx + voices) files in {path}; set `task:` if the files are named differently"
                )
            specs[entry.id] = ModelSpec(
                id=entry.id,
                task=task,
                source="config",
                path=path,
                options=dict(entry.options),
                pin=entry.pin,
                idle_timeout=entry.idle_timeout,
                size_bytes=dir_size(path),
            )
        else:
            task = entry.task or task_from_repo(entry.repo)
            if task is None:
                raise ValueError(
                    f"model {entry.id!r}: cannot tell the task of repo {entry.repo!r}; set `task:`"
                )
            specs[entry.id] = ModelSpec(
                id=entry.id,
                task=task,
                source="hf",
                repo_id=entry.repo,
                revision=entry.revision,
                options=dict(entry.options),
                pin=entry.pin,
                idle_timeout=entry.idle_timeout,
                size_bytes=hub_sizes.get(entry.repo, 0),
            )
    return specs


def discover_local(models_dir: Path) -> dict[str, ModelSpec]:
    """Every model directory directly under `models_dir` (hidden and unrecognised ones skipped)."""
    specs: dict[str, ModelSpec] = {}
    if not models_dir.is_dir():
        return specs
    for child in sorted(models_dir.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        try:
            path = safe_model_dir(models_dir, child.name)
        except UnsafeModelId:
            log.warning("skipping model directory with an unusable name: %r", child.name)
            continue
        task = detect_task(path)
        if task is None:
            continue
        specs[child.name] = ModelSpec(
            id=child.name, task=task, source="local", path=path, size_bytes=dir_size(path)
        )
    return specs


def load_aliases(path: Path | None) -> dict[str, list[str]]:
    """The alias file: {"whisper-1": "id" or ["first choice", "fallback", ...]}. Default: built in."""
    if path is None:
        text = resources.files("earshot").joinpath("model_aliases.json").read_text(encoding="utf-8")
        source = "built-in model_aliases.json"
    else:
        text = path.read_text(encoding="utf-8")
        source = str(path)
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{source}: must be a JSON object mapping names to model ids")
    out: dict[str, list[str]] = {}
    for name, target in data.items():
        targets = [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{source}: alias {name!r} must map to a model id or a list of ids")
        out[str(name)] = targets
    return out


def build_catalog(
    *,
    models_dir: Path,
    entries: Iterable[Any] = (),
    aliases_file: Path | None = None,
    builtin_hub_models: bool = True,
) -> Catalog:
    """Assemble the catalog from config entries, the models directory and the known hub models."""
    hub_sizes = cached_repo_sizes()
    specs: dict[str, ModelSpec] = _config_specs(entries, hub_sizes)
    for model_id, spec in discover_local(models_dir).items():
        specs.setdefault(model_id, spec)
    if builtin_hub_models:
        for repo, task in KNOWN_HUB_MODELS.items():
            specs.setdefault(
                repo,
                ModelSpec(
                    id=repo,
                    task=task,
                    source="hf",
                    repo_id=repo,
                    options=dict(KNOWN_HUB_OPTIONS.get(repo, {})),
                    size_bytes=hub_sizes.get(repo, 0),
                ),
            )
    resolved: dict[str, str] = {}
    for name, targets in load_aliases(aliases_file).items():
        if name in specs:
            log.info("alias %s ignored: a model has that id", name)
            continue
        target = next((t for t in targets if t in specs), None)
        if target is None:
            log.info("alias %s ignored: none of %s is in the catalog", name, targets)
            continue
        resolved[name] = target
    return Catalog(specs=specs, aliases=resolved)
