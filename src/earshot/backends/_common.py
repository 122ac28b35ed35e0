"""Helpers shared by the backends: model directory size, out-of-memory detection."""

from __future__ import annotations

from earshot.models.files import dir_size
from earshot.types import ModelSpec

_OOM_MARKERS = (
    "out of memory",
    "cuda_error_out_of_memory",
    "cudaerrormemoryallocation",
    "failed to allocate memory",
    "bad_alloc",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception from CTranslate2 / onnxruntime / CUDA / numpy means "out of memory"."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def spec_footprint(spec: ModelSpec) -> int:
    """Estimated bytes of a model before it is loaded: the size of its local files, else
    `spec.size_bytes` (the catalog's estimate; 0 when unknown). Never touches the network."""
    if spec.path is not None and spec.path.is_dir():
        return dir_size(spec.path)
    return max(0, spec.size_bytes)
