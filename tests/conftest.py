"""Fixtures shared by every test: where the demo models and the test audio are."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)
DEMO_MODELS = ("faster-whisper-tiny.en", "faster-whisper-base", "kokoro-82m-v1.0-int8")


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts."""
    return re.findall(r"[a-z0-9']+", text.lower())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def jfk_flac() -> Path:
    for candidate in (REPO / "tests" / "data" / "jfk.flac", SHARED / "audio" / "jfk.flac"):
        if candidate.is_file():
            return candidate
    pytest.fail("jfk.flac not found in tests/data/ or ../shared/audio/")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The demo models, assembled by `earshot models install-demo` (make test runs it first)."""
    path = Path(os.environ.get("EARSHOT_TEST_MODELS_DIR", REPO / "models")).resolve()
    missing = [m for m in DEMO_MODELS if not (path / m).is_dir()]
    if missing:
        pytest.fail(
            f"demo models missing in {path}: {missing}; run `make test` or `earshot models install-demo`"
        )
    return path
