"""The Hugging Face Hub side of the catalog, all through huggingface_hub (blocking; run in worker threads):

- `lookup(repo)`: what a repo holds, to decide its task, without downloading weights: the Hub's file
  list online; the local HF cache offline (`HF_HUB_OFFLINE=1`) or when the Hub cannot be reached.
- `download(spec)`: the files `load` needs (`allow_patterns`), into the standard HF cache, with
  huggingface_hub's own progress bars, written to the log. Stoppable by its caller (a timeout, or a
  cancel event), checked at every chunk.
- `local_path(spec)`: the model's directory for `load`: the cached snapshot when it is complete,
  else a download (the path when no `fetch` ran first).
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from earshot.models.errors import (
    DownloadCancelled,
    HubModelNotFound,
    HubUnreachable,
    ModelDownloadError,
    NotAHubId,
    shown,
)
from earshot.models.files import download_patterns, list_dir
from earshot.types import ModelSpec, Task

log = logging.getLogger("earshot.models.hub")

# Well-known repos listed in the catalog when `builtin_hub_models` is on (the default), so the ids
# clients know from Speaches and the faster-whisper world work unchanged. Fetched on first use.
KNOWN_HUB_MODELS: dict[str, Task] = {
    **{
        f"Systran/faster-whisper-{size}": Task.TRANSCRIPTION
        for size in (
            "tiny",
            "tiny.en",
            "base",
            "base.en",
            "small",
            "small.en",
            "medium",
            "medium.en",
            "large-v1",
            "large-v2",
            "large-v3",
        )
    },
    # distil-whisper, converted to CTranslate2
    **{
        f"Systran/faster-distil-whisper-{size}": Task.TRANSCRIPTION
        for size in ("small.en", "medium.en", "large-v2", "large-v3")
    },
    "distil-whisper/distil-large-v3.5-ct2": Task.TRANSCRIPTION,
    # large-v3-turbo conversions
    "deepdml/faster-whisper-large-v3-turbo-ct2": Task.TRANSCRIPTION,
    "mobiuslabsgmbh/faster-whisper-large-v3-turbo": Task.TRANSCRIPTION,
    "h2oai/faster-whisper-large-v3-turbo": Task.TRANSCRIPTION,
    # Kokoro ONNX exports
    "speaches-ai/Kokoro-82M-v1.0-ONNX": Task.SPEECH,
    "speaches-ai/Kokoro-82M-v1.0-ONNX-int8": Task.SPEECH,
    "speaches-ai/Kokoro-82M-v1.0-ONNX-fp16": Task.SPEECH,
    "onnx-community/Kokoro-82M-v1.0-ONNX": Task.SPEECH,
}
# Options a known repo's layout needs: the onnx-community export holds eight ONNX variants under
# onnx/ and per-voice files under voices/; only the one model file is downloaded.
KNOWN_HUB_OPTIONS: dict[str, dict[str, Any]] = {
    "onnx-community/Kokoro-82M-v1.0-ONNX": {"onnx_file": "onnx/model.onnx"},
}

LOOKUP_TIMEOUT_S = 10.0
# A repo's file list is read up to this many entries (a model repo has tens).
MAX_LISTED_FILES = 10_000
PROGRESS_INTERVAL_S = 5.0

ModelFetchError = ModelDownloadError  # the old name


def check_hub_id(name: str) -> str:
    """`name` when it is an `owner/name` repo id by huggingface_hub's own rules; NotAHubId otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils._validators import validate_repo_id

    if name.count("/") != 1 or len(name) > 96:
        raise NotAHubId(f"{shown(name)!r} is not an owner/name Hugging Face repo id", model=name)
    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise NotAHubId(f"{shown(name)!r} is not a valid Hugging Face repo id", model=name) from exc
    return name


def is_hub_id(name: str) -> bool:
    try:
        check_hub_id(name)
    except NotAHubId:
        return False
    return True


@dataclass(frozen=True)
class RepoListing:
    """A repo's files (relative paths) and their sizes, and where the list came from."""

    repo_id: str
    files: tuple[str, ...]
    sizes: Mapping[str, int] = field(default_factory=dict)
    source: str = "hub"  # "hub" (the Hub's file list) or "cache" (the local HF cache)
    revision: str | None = None  # the commit the list is of, when known


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def from_cache(repo_id: str, revision: str | None) -> RepoListing | None:
    """The repo as the local HF cache has it (huggingface_hub resolves refs/ to a snapshot), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    files = list_dir(folder, max_files=MAX_LISTED_FILES)
    sizes = {}
    for name in files:
        try:
            sizes[name] = (folder / name).stat().st_size
        except OSError:
            continue
    return RepoListing(repo_id, tuple(files), sizes, source="cache", revision=folder.name)


def lookup(repo_id: str, revision: str | None = None) -> RepoListing:
    """What `repo_id` holds: the Hub's file list (no weights downloaded), or the local HF cache when
    offline or when the Hub cannot be reached. Blocking.

    Raises HubModelNotFound (no such repo or revision, or private/gated), HubUnreachable (the Hub
    cannot be reached and the repo is not cached)."""
    check_hub_id(repo_id)
    if _offline():
        cached = from_cache(repo_id, revision)
        if cached is None:
            raise HubUnreachable(
                f"The model {repo_id!r} is not in the local Hugging Face cache, and the Hub is not "
                "contacted: offline mode is on (HF_HUB_OFFLINE=1). Download it where the Hub can be "
                "reached (`earshot models pull`), or copy it in with `earshot models import`.",
                model=repo_id,
            )
        return cached
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=LOOKUP_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        what = "revision of the repo" if isinstance(exc, RevisionNotFoundError) else "repo"
        raise HubModelNotFound(
            f"The model {repo_id!r} does not exist: the Hugging Face Hub has no such {what} "
            "(or it is private or gated, which earshot does not serve without a token).",
            model=repo_id,
        ) from exc
    except (httpx2.HTTPError, HfHubHTTPError, OSError) as exc:
        cached = from_cache(repo_id, revision)
        if cached is not None:
            log.info("hub unreachable (%s); %s resolved from the local cache", type(exc).__name__, repo_id)
            return cached
        raise HubUnreachable(
            f"The Hugging Face Hub cannot be reached ({type(exc).__name__}) and the model {repo_id!r} "
            "is not in the local Hugging Face cache. Try again later, or import the model with "
            "`earshot models import`.",
            model=repo_id,
        ) from exc
    files: list[str] = []
    sizes: dict[str, int] = {}
    for sibling in (info.siblings or [])[:MAX_LISTED_FILES]:
        files.append(sibling.rfilename)
        if sibling.size is not None:
            sizes[sibling.rfilename] = int(sibling.size)
    return RepoListing(repo_id, tuple(files), sizes, source="hub", revision=info.sha)


# ---------------------------------------------------------------------------------------- download


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor between its bars


class _LogStream(io.TextIOBase):
    """Where the progress bars write: each refresh of a bar becomes one log line."""

    def __init__(self, repo_id: str) -> None:
        self.repo_id = repo_id

    def write(self, text: str) -> int:
        line = _ANSI.sub("", text).replace("\r", "").strip()
        if line:
            log.info("download %s: %s", self.repo_id, line, extra={"model": self.repo_id})
        return len(text)

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        return None


def _progress_class(repo_id: str, deadline: float | None, cancel: threading.Event | None) -> type[Any]:
    """huggingface_hub's own tqdm, writing to the log at most every PROGRESS_INTERVAL_S, and
    stopping the download (at its next chunk) once `deadline` passes or `cancel` is set."""
    from huggingface_hub.utils.tqdm import are_progress_bars_disabled
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    stream = _LogStream(repo_id)

    class LoggedProgress(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = are_progress_bars_disabled(kwargs.get("name"))
            kwargs["file"] = stream
            kwargs.setdefault("mininterval", PROGRESS_INTERVAL_S)
            kwargs["ascii"] = True
            kwargs["ncols"] = 100
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

        def update(self, n: float | None = 1) -> bool | None:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(f"download of {repo_id} cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise DownloadCancelled(f"download of {repo_id} stopped: model_download_timeout passed")
            result: bool | None = super().update(n)
            return result

    return LoggedProgress


def _patterns(spec: ModelSpec) -> list[str]:
    return download_patterns(spec.task, spec.options)


def download(
    spec: ModelSpec,
    *,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Download the files `load` needs of a hub model into the HF cache (a no-op for a local model,
    and quick when they are there already); return the snapshot directory. Blocking.

    `timeout` (seconds) and `cancel` stop it at the next chunk with DownloadCancelled, so a caller
    that gives up (model_download_timeout) does not leave a download running; a later download
    resumes the partial files."""
    if spec.path is not None:
        return spec.path
    if spec.repo_id is None:
        raise ModelDownloadError(f"model {spec.id!r} has neither a path nor a Hugging Face repo")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    deadline = None if timeout is None else time.monotonic() + timeout
    started = time.monotonic()
    log.info("downloading %s (%s) into the Hugging Face cache", spec.repo_id, ", ".join(_patterns(spec)))
    try:
        path = Path(
            snapshot_download(
                repo_id=spec.repo_id,
                revision=spec.revision,
                allow_patterns=_patterns(spec),
                tqdm_class=_progress_class(spec.repo_id, deadline, cancel),
                max_workers=4,
            )
        )
    except DownloadCancelled:
        raise
    except LocalEntryNotFoundError as exc:
        raise ModelDownloadError(
            f"model {spec.id!r}: {spec.repo_id} is not in the Hugging Face cache and the Hub cannot be "
            f"reached (HF_HUB_OFFLINE set, or no network): {exc}"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelDownloadError(f"model {spec.id!r}: download of {spec.repo_id} failed: {exc}") from exc
    log.info("downloaded %s in %.1f s: %s", spec.repo_id, time.monotonic() - started, path)
    return path


def cached_snapshot(spec: ModelSpec) -> Path | None:
    """The complete cached snapshot of a hub model's needed files, or None. Never touches the network."""
    if spec.repo_id is None:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(
                repo_id=spec.repo_id,
                revision=spec.revision,
                allow_patterns=_patterns(spec),
                local_files_only=True,
            )
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if path.is_dir() else None


def local_path(spec: ModelSpec) -> Path:
    """The local directory holding the model's files: its path, the cached snapshot, or (when no
    `fetch` ran first) a download now."""
    if spec.path is not None:
        return spec.path
    return cached_snapshot(spec) or download(spec)


def cached_repo_sizes() -> dict[str, int]:
    """Size on disk of each model repo in the local HF cache (largest revision). Never touches the network."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir()
    except Exception:  # no cache dir yet, unreadable cache
        return {}
    return {
        repo.repo_id: max((r.size_on_disk for r in repo.revisions), default=0)
        for repo in info.repos
        if repo.repo_type == "model"
    }


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(os.path.expanduser(constants.HF_HUB_CACHE))
