"""Fetch a model from the Hugging Face Hub into the standard HF cache, with huggingface_hub's own
progress bars. `HF_HUB_OFFLINE=1` is honoured by huggingface_hub itself: then only what is cached
already is used, and a model not cached fails with a clear error."""

from __future__ import annotations

from pathlib import Path

from earshot.types import ModelSpec, Task

# Well-known repos listed in the catalog when `builtin_hub_models` is on (the default), so the ids
# clients know from Speaches work unchanged. Fetched on first use into the standard HF cache.
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
            "large-v2",
            "large-v3",
        )
    },
    "deepdml/faster-whisper-large-v3-turbo-ct2": Task.TRANSCRIPTION,
    "speaches-ai/Kokoro-82M-v1.0-ONNX": Task.SPEECH,
    "speaches-ai/Kokoro-82M-v1.0-ONNX-int8": Task.SPEECH,
}


class ModelFetchError(Exception):
    """The model's files could not be fetched (offline, hub unreachable, no such repo)."""


def local_path(spec: ModelSpec, *, download: bool = True) -> Path:
    """The local directory holding the model's files, downloading them first for a hub model
    (with `download=False`, only what the HF cache holds already: ModelFetchError otherwise).

    Runs in the cache's worker thread (the download is part of the load and counts toward
    `model_load_timeout`)."""
    if spec.path is not None:
        return spec.path
    if spec.repo_id is None:
        raise ModelFetchError(f"model {spec.id!r} has neither a path nor a Hugging Face repo")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id=spec.repo_id, revision=spec.revision, local_files_only=not download)
        )
    except LocalEntryNotFoundError as exc:
        raise ModelFetchError(
            f"model {spec.id!r}: {spec.repo_id} is not in the Hugging Face cache and the hub cannot be "
            f"reached (HF_HUB_OFFLINE set, or no network): {exc}"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelFetchError(f"model {spec.id!r}: download of {spec.repo_id} failed: {exc}") from exc


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
