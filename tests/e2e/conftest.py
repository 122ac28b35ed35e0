"""One stack for the end-to-end tests: earshot, real Prometheus and real Alertmanager on loopback.

The Prometheus and Alertmanager configurations are derived from the repository's prometheus.yml
and alertmanager.yml (tests/support/stack.py) with the real alerts/*.rules.yml; only the timing is
shortened for a test: scrape and evaluate every second, Alertmanager groups notified after 1 s.
The alert rules' own windows (`rate[2m]`, `for: 1m`) are as operators run them.

earshot runs with max_models=1 (two models alternating = an eviction storm), a long idle timeout
and thrash window (so every eviction is `capacity` and every load after one is a reload), on CPU,
with one deliberately broken model (a faster-whisper directory whose model.bin is garbage) so a
request can fail with 503: the dashboard's error-rate panel and earshot_http_requests_error_total
need a 5xx to exist.
"""

from __future__ import annotations

import io
import shutil
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import psutil
import pytest

from tests.support.stack import Stack, StackError, find_executable

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"
BROKEN = "broken-whisper"
CLIP_SECONDS = 2.0

EARSHOT_SETTINGS = {
    "max_models": 1,
    "model_idle_timeout": 3600,
    "thrash_window_seconds": 3600,
    "device": "cpu",
    "log_level": "INFO",
}
# Shortened for the test; everything else (routes, grouping, inhibition) as in alertmanager.yml.
ALERTMANAGER_TIMING = {
    "group_wait": "1s",
    "group_interval": "1s",
    "resolve_timeout": "30s",
}


@pytest.fixture(scope="session")
def clip_wav(jfk_flac: Path) -> bytes:
    """The first CLIP_SECONDS of jfk.flac as 16 kHz mono WAV: short audio = short requests = more
    loads per minute in a storm."""
    samples = []
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    with av.open(str(jfk_flac)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                samples.append(out.to_ndarray().reshape(-1))
    pcm = np.concatenate(samples)[: int(16000 * CLIP_SECONDS)].astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="session")
def broken_model(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A faster-whisper model directory whose weights are garbage: every load fails."""
    path = tmp_path_factory.mktemp("models") / BROKEN
    path.mkdir()
    shutil.copy(models_dir / TINY / "config.json", path / "config.json")
    (path / "model.bin").write_bytes(b"not a CTranslate2 model\n" * 64)
    return path


@pytest.fixture(scope="session")
def stack(models_dir: Path, broken_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for tool in ("prometheus", "prometheus-alertmanager|alertmanager"):
        try:
            find_executable(*tool.split("|"))
        except StackError as e:
            pytest.fail(str(e))
    settings = {
        **EARSHOT_SETTINGS,
        "models": [{"id": BROKEN, "path": str(broken_model), "task": "transcription"}],
    }
    stack = Stack(
        run_dir=tmp_path_factory.mktemp("stack"),
        scrape_interval="1s",
        evaluation_interval="1s",
        alertmanager_timing=ALERTMANAGER_TIMING,
        earshot_settings=settings,
        models_dir=models_dir,
    )
    with stack:
        stack.wait_scraped()
        yield stack
    # Every process the stack started, and any child of theirs, is gone.
    assert stack.leftovers() == [], stack.pids()
    assert [pid for pid in stack.pids().values() if psutil.pid_exists(pid)] == [], stack.pids()
    assert stack.receiver is not None
    assert not stack.receiver.alive
