"""The download step of hub models, run for real (huggingface_hub's snapshot_download) against the
stand-in Hub: `Backend.fetch` downloads only what `load` needs and `load` then needs no network; the
caller can stop a download (cancel event, timeout) and a later one completes it; progress is logged.

Each case runs in a fresh interpreter: huggingface_hub reads HF_ENDPOINT / HF_HOME at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hfcache import whisper_files
from tests.support.hubserver import FakeHub, fake_hub

pytestmark = pytest.mark.slow

REPO = "remote-owner/whisper-ct2"

SCRIPT = """
import json, logging, sys, threading
from earshot.backends.whisper import WhisperBackend
from earshot.cache.protocol import ModelSpec, Task
from earshot.models.errors import DownloadCancelled
from earshot.models.hub import cached_snapshot, download

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
spec = ModelSpec(id=sys.argv[1], task=Task.TRANSCRIPTION, source="hf", repo_id=sys.argv[1])
out = {}
cancel = threading.Event()
cancel.set()
try:
    download(spec, cancel=cancel)
    out["cancelled"] = False
except DownloadCancelled:
    out["cancelled"] = True
try:
    download(spec, timeout=1e-9)
    out["timed_out"] = False
except DownloadCancelled:
    out["timed_out"] = True
out["complete_before_fetch"] = cached_snapshot(spec) is not None
backend = WhisperBackend(device="cpu", compute_type="int8")
backend.fetch(spec, timeout=600)
out["complete_after_fetch"] = cached_snapshot(spec) is not None
print("LOAD-STARTS", file=sys.stderr, flush=True)
handle = backend.load(spec)
out["loaded"] = handle is not None
backend.unload(handle)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub(models_dir: Path) -> Iterator[FakeHub]:
    files = {**whisper_files(models_dir / "faster-whisper-tiny.en"), "pytorch_model.bin": b"\0" * 4096}
    with fake_hub({REPO: files}) as fake:
        yield fake


def test_fetch_then_load_and_a_stopped_download(hub: FakeHub, tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, REPO], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {
        "cancelled": True,
        "timed_out": True,
        "complete_before_fetch": False,
        "complete_after_fetch": True,
        "loaded": True,
    }
    progress = [
        line for line in run.stderr.splitlines() if line.startswith(f"earshot.models.hub download {REPO}:")
    ]
    assert any("100%" in line for line in progress), run.stderr[-3000:]
    fetched = hub.resolved(REPO)
    assert "pytorch_model.bin" not in fetched
    assert fetched.count("model.bin") >= 1
    # load after fetch touches no network: no request after "LOAD-STARTS"
    during_load = run.stderr.split("LOAD-STARTS", 1)[1]
    assert "HTTP Request" not in during_load
