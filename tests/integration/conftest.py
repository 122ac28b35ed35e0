"""Servers for the integration tests: the real app under uvicorn on 127.0.0.1, with the demo models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import Server, run_server


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with default settings, shared by the tests of one module."""
    with run_server(models_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv
