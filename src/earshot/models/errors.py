"""Why a model id could not be resolved. The API maps each to its status (api/errors.py); the messages
are meant for the client as they are (an id in them is cut to 80 characters)."""

from __future__ import annotations


def shown(name: str) -> str:
    return name if len(name) <= 80 else name[:77] + "..."


class ModelResolutionError(Exception):
    """A model id the catalog does not list and that could not be added to it."""

    code = "model_resolution_failed"

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.message = message
        self.model = model


class NotAHubId(ModelResolutionError):
    """Not in the catalog, and not of the form `owner/name` by the Hub's own repo-id rules."""

    code = "model_not_found"


class HubModelNotFound(ModelResolutionError):
    """The Hub says the repo (or the revision) does not exist, or it is private or gated."""

    code = "model_not_found"


class NotServable(ModelResolutionError):
    """The repo exists, but its files are neither a CTranslate2 Whisper model nor a Kokoro ONNX model."""

    code = "model_not_servable"


class HubUnreachable(ModelResolutionError):
    """The Hub cannot be reached (offline mode, no network, a Hub error) and the repo is not cached."""

    code = "hub_unreachable"


class CatalogFull(ModelResolutionError):
    """`max_catalog_models` hub ids were added already."""

    code = "catalog_full"


class HubModelsDisabled(ModelResolutionError):
    """`allow_hub_models` is off."""

    code = "hub_models_disabled"


class ModelDownloadError(Exception):
    """A model's files could not be downloaded (offline and not cached, Hub error, disk error)."""


class DownloadCancelled(ModelDownloadError):
    """The download was stopped by its caller (timeout, or a cancel event set)."""
