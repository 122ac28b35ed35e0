"""Decoding untrusted audio (issue 17): any channel count, refusals from the header, the decode pool
(crash and memory limit of a worker cost one request, not the process), truncated error echoes.

The pool tests run real worker processes (forkserver) with real PyAV; faults are injected with a
hook that runs in the worker before it decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import tracemalloc
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
from prometheus_client import CollectorRegistry

from earshot.api.errors import APIError, from_exception
from earshot.audio.decode import MAX_CHANNELS, decode_audio
from earshot.audio.errors import AudioDecodeError, AudioTooLong
from earshot.audio.pool import DecodePool
from tests.support.audio import wav as mono_wav
from tests.support.stack import wait_until


def multichannel_wav(channels: int, *, rate: int = 16000, seconds: float = 1.0) -> bytes:
    """A WAV of `channels` channels: channel k holds a tone of amplitude (k+1)/channels * 0.25."""
    n = int(rate * seconds)
    t = np.arange(n) / rate
    tone = np.sin(2 * np.pi * 440 * t)
    gains = (np.arange(channels) + 1) / channels * 0.25
    pcm = (tone[:, None] * gains[None, :] * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def surround_flac(layout: str = "7.1", rate: int = 48000) -> bytes:
    """One second of 7.1 FLAC (PyAV's encoder): the same tone in every channel."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout=layout)
        channels = stream.codec_context.layout.nb_channels
        tone = (np.sin(2 * np.pi * 440 * np.arange(rate) / rate) * 8000).astype("<i2")
        frame = av.AudioFrame.from_ndarray(
            np.tile(tone, (channels, 1)).T.reshape(1, -1), format="s16", layout=layout
        )
        frame.rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def crash_on_marker(data: bytes) -> None:
    """Fault injection, run in the decode worker: a SIGSEGV for input ending in b"CRASH"."""
    if data.endswith(b"CRASH"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if data.endswith(b"HOG"):
        hog = bytearray(3 * 2**30)  # over the worker's memory limit
        del hog


@pytest.fixture
async def pool() -> AsyncIterator[DecodePool]:
    decoders = DecodePool(2, memory_bytes=512 * 2**20, registry=CollectorRegistry(), hook=crash_on_marker)
    await decoders.warm()
    yield decoders
    decoders.close()


def failures(decoders: DecodePool, reason: str) -> float:
    return float(decoders._failures.labels(reason=reason)._value.get())


async def test_every_channel_count_up_to_the_limit_decodes_to_the_mean(pool: DecodePool) -> None:
    # Without the packed down-mix, 8 and more channels crashed the decoder (to_ndarray, SIGSEGV).
    for channels in range(1, MAX_CHANNELS + 1):
        out = await pool.decode(multichannel_wav(channels))
        assert out.shape == (16000,), channels
        # the mean of the channel gains: (channels + 1) / (2 * channels) * 0.25
        expected = (channels + 1) / (2 * channels) * 0.25
        assert abs(float(np.abs(out).max()) - expected) < 0.01, channels
    assert failures(pool, "crashed") == 0


async def test_a_7_1_flac_decodes(pool: DecodePool) -> None:
    out = await pool.decode(surround_flac())
    assert out.shape == (16000,)
    assert 0.2 < float(np.abs(out).max()) < 0.3


async def test_more_channels_than_the_resampler_takes_is_refused_from_the_header(pool: DecodePool) -> None:
    with pytest.raises(AudioDecodeError, match="65 channels"):
        await pool.decode(multichannel_wav(MAX_CHANNELS + 1, seconds=0.1))
    assert failures(pool, "invalid") == 1


async def test_a_crashed_worker_fails_its_request_only_and_is_replaced(
    pool: DecodePool, jfk_flac: Path
) -> None:
    jfk = jfk_flac.read_bytes()
    crashed, beside = await asyncio.gather(
        pool.decode(multichannel_wav(2) + b"CRASH"), pool.decode(jfk), return_exceptions=True
    )
    assert isinstance(crashed, AudioDecodeError)
    assert "worker process died" in str(crashed)
    assert isinstance(beside, np.ndarray)
    assert beside.size > 10 * 16000  # the decode beside it is unharmed
    api = from_exception(crashed)
    assert (api.status, api.code) == (400, "invalid_audio")
    assert failures(pool, "crashed") == 1
    for _ in range(3):  # both workers serve again
        assert (await pool.decode(jfk)).size == beside.size


async def test_a_decode_over_the_memory_limit_is_refused_not_grown(pool: DecodePool) -> None:
    with pytest.raises(AudioDecodeError, match="more memory"):
        await pool.decode(multichannel_wav(1) + b"HOG")
    assert failures(pool, "out_of_memory") == 1
    assert (await pool.decode(multichannel_wav(2))).shape == (16000,)


async def test_a_cancelled_decode_gives_its_worker_back(pool: DecodePool, jfk_flac: Path) -> None:
    jfk = jfk_flac.read_bytes()
    tasks = [asyncio.ensure_future(pool.decode(jfk)) for _ in range(2)]
    await asyncio.sleep(0.01)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(4):
        assert (await asyncio.wait_for(pool.decode(jfk), 60)).size > 0


OWNER = """
import asyncio, psutil
from earshot.audio.pool import DecodePool

async def main():
    pool = DecodePool(2)
    await pool.warm()
    print(" ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


def ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def left(pids: list[int]) -> list[str]:
    """What is still running of `pids`: their command lines, cut short."""
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if not ended(pid):
                out.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]}")
    return out


def test_the_workers_end_when_the_server_is_killed() -> None:
    """The OOM killer, a SIGKILL, or uvicorn re-raising SIGTERM after its shutdown ends the server
    without its interpreter's exit: its decode workers (children of the fork server, each holding
    both ends of its own call pipe) and the fork server must not live on."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert owner.stdout is not None
        helpers = [int(pid) for pid in owner.stdout.readline().split()]
        forked = [pid for pid in helpers if "forkserver" in " ".join(psutil.Process(pid).cmdline())]
        assert len(forked) >= 3, helpers  # the fork server and the two workers forked from it
        owner.kill()
        owner.wait(10)
        wait_until(lambda: all(map(ended, helpers)), 20, lambda: f"still running: {left(helpers)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(owner.pid, signal.SIGKILL)  # whatever the test left: the same process group
        owner.wait(10)


def test_a_1_hz_header_is_refused_before_resampling_allocates() -> None:
    # 8,000 samples at 1 Hz: resampled to 16 kHz they would be 128 million samples (512 MB).
    data = mono_wav(b"\0\1" * 8000, rate=1)
    tracemalloc.start()
    try:
        with pytest.raises(AudioDecodeError, match="sample rate 1 Hz"):
            decode_audio(data, sample_rate=16000, max_seconds=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_a_claimed_duration_over_the_limit_is_refused_from_the_header() -> None:
    data = mono_wav(b"\0\1" * 8000, rate=1000)  # 8 s at 1 kHz, as the header says
    with pytest.raises(AudioTooLong):
        decode_audio(data, sample_rate=16000, max_seconds=5)
    assert decode_audio(data, sample_rate=16000, max_seconds=10).size == 8 * 16000


def test_error_messages_cut_quoted_client_input() -> None:
    error = APIError(400, f"unknown voice {'v' * 100_000!r}; available voices: alloy")
    assert len(error.message) < 200
    assert error.message.endswith("available voices: alloy")
    assert len(APIError(400, "x" * 100_000).message) <= 1024
