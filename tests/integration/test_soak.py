"""Soak under an eviction storm: three demo models, room for one (`max_models=1`), client threads
asking for a model at random on every request (tiny.en and base transcriptions of a 3 s clip,
Kokoro speech of a short sentence) for EARSHOT_SOAK_SECONDS (default 60; `make soak` sets 600).

Afterwards:

- no 5xx (nor any other non-200): three clients and the default model_load_timeout (300 s) leave
  a waiting load ample time to find room, so `cache_full` cannot happen;
- every response is right: transcripts match the clip loosely, speech decodes (PyAV) to a
  plausible duration;
- for each model, successful loads - evictions (all reasons) == loaded now (/metrics);
- the server's RSS with no model loaded at the end is at most 10 % above its value after the warm-up
  (the first minute; for runs shorter than three minutes, the first third: ~20 s of the default
  60 s, which already cycles every model through load and eviction several times), and with Kokoro
  freshly loaded within 15 %;
- each model's footprint (the figure in force after each load: the median of its last readings,
  earshot.cache.footprint) stays within 10 % of its median from the fifth load on, in runs of three
  minutes or more (the first
  reading of a library pays for its one-time set-up, and a reading taken while other threads free
  memory is low: a median of fewer than five readings can still sit on such a value);
- threads and open file descriptors do not grow between those two points.

Both measuring points see the same state: clients paused and every request finished, every model
unloaded (manual unload: gc.collect + malloc_trim; RSS "no model" read here), then Kokoro loaded
afresh (RSS read again, with threads and fds, after 12 s of quiet: uvicorn closes idle keep-alive
connections after 5 s and AnyIO's idle worker threads exit after 10 s, so neither is counted at one
point and not at the other). A fresh load, not whichever model the storm left resident: a model's
RSS grows with use (onnxruntime and CTranslate2 keep their work buffers), by up to ~100 MiB for
Kokoro, which alone would swing the comparison by 20 %. Slack: +3 threads (asyncio's default executor, up to min(32, cores + 4) threads, may
still add a worker it had not needed during the warm-up) and +2 file descriptors (one keep-alive
connection of the measuring client, plus one for whatever the runtime opened lazily, e.g. a
library's first log or cache file).
"""

from __future__ import annotations

import io
import os
import random
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import words
from tests.support.audio import clip_wav
from tests.support.server import Server, run_server

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"
MODELS = (TINY, BASE, KOKORO)
SOAK_SECONDS = float(os.environ.get("EARSHOT_SOAK_SECONDS", "60"))
WARMUP_SECONDS = 60.0 if SOAK_SECONDS >= 180 else SOAK_SECONDS / 3
CLIENTS = 3
SETTLE_SECONDS = 12.0  # > uvicorn's keep-alive timeout (5 s) and AnyIO's idle-thread exit (10 s)
EMPTY_SETTLE_SECONDS = 3.0
RSS_TOLERANCE = 0.15  # Kokoro loaded: its work buffers vary with what it said last
# No model loaded. The bound (10%) holds from the first minute of a long soak (`make soak`);
# CI's 60 s run takes its first reading after 20 s, while one-time growth (allocator arenas, glibc's
# cache of exited threads' stacks: each load runs on a thread of its own) is still filling: one CI
# run read 248 -> 274 MiB (+10.2%), a local one 211 -> 213. A leak of a model's size still fails it.
EMPTY_RSS_TOLERANCE = 0.10 if SOAK_SECONDS >= 180 else 0.20
FOOTPRINT_TOLERANCE = 0.10
FOOTPRINT_SETTLED_AFTER = 4  # loads: the figure is a median of the last ones (9), from the fifth on
THREAD_SLACK = 3
FD_SLACK = 2
SENTENCE = "Hello world, this is a soak test."


# ---------------------------------------------------------------------------------------- helpers


def seconds_of(audio: bytes) -> float:
    with av.open(io.BytesIO(audio)) as container:
        stream = container.streams.audio[0]
        return sum(f.samples / f.sample_rate for f in container.decode(stream))


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= lab)


@dataclass
class Pauser:
    """Clients pass `checkpoint()` before each request; `pause()` returns once none is in flight."""

    paused: bool = False
    active: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def checkpoint(self) -> None:
        with self.cond:
            while self.paused:
                self.cond.wait()
            self.active += 1

    def done(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def pause(self) -> None:
        with self.cond:
            self.paused = True
            while self.active:
                self.cond.wait()

    def resume(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify_all()


@dataclass
class Outcome:
    model: str
    status: int
    seconds: float
    problem: str | None  # None: the response was right


def one_request(client: httpx.Client, model: str, clip: bytes, rng: random.Random) -> Outcome:
    started = time.monotonic()
    problem: str | None = None
    if model == KOKORO:
        fmt = rng.choice(("wav", "mp3"))
        r = client.post(
            "/v1/audio/speech",
            json={"model": KOKORO, "input": SENTENCE, "voice": "alloy", "response_format": fmt},
        )
        if r.status_code == 200:
            duration = seconds_of(r.content)
            if not 1.0 < duration < 6.0:
                problem = f"speech of {duration:.2f}s"
    else:
        r = client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", clip)}, data={"model": model})
        if r.status_code == 200:
            got = words(r.json()["text"])
            if "fellow" not in got or not 3 <= len(got) <= 10:
                problem = f"transcript {r.json()['text']!r}"
    if r.status_code != 200:
        problem = f"{r.status_code}: {r.text[:300]}"
    return Outcome(model, r.status_code, time.monotonic() - started, problem)


def footprints_mib(server: Server) -> dict[str, list[tuple[float, float]]]:
    """Per model, (footprint in force, this load's own reading) in MiB for each of its loads."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in server.log_lines():
        if line.get("event") == "model_loaded" and line.get("measured"):
            out[line["model"]].append(
                (round(line["footprint_bytes"] / 2**20, 1), round(line["reading_bytes"] / 2**20, 1))
            )
    return dict(out)


@dataclass
class Snapshot:
    rss_empty: int  # no model loaded
    rss: int  # Kokoro freshly loaded, nothing else
    threads: int
    fds: int


def settle_and_measure(server: Server, control: httpx.Client, pauser: Pauser) -> Snapshot:
    """Pause the clients and bring the server to the same state as at the other point: every model
    unloaded (manual unload: gc.collect + malloc_trim), then Kokoro loaded afresh, then quiet."""
    pauser.pause()
    proc = psutil.Process(server.process.pid)
    models = control.get("/api/ps").json()["models"]
    assert all(m["in_use"] == 0 for m in models), models
    for m in models:
        assert control.delete(f"/api/ps/{m['model']}").status_code == 200
    time.sleep(EMPTY_SETTLE_SECONDS)
    rss_empty = proc.memory_info().rss
    r = control.post(f"/api/ps/{KOKORO}")
    assert r.status_code == 200, r.text
    time.sleep(SETTLE_SECONDS)
    [loaded] = [m["model"] for m in control.get("/api/ps").json()["models"]]
    assert loaded == KOKORO
    return Snapshot(
        rss_empty=rss_empty, rss=proc.memory_info().rss, threads=proc.num_threads(), fds=proc.num_fds()
    )


# ------------------------------------------------------------------------------------------- test


@pytest.fixture(scope="module")
def soak_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        models_dir,
        tmp_path_factory.mktemp("soak"),
        max_models=1,
        model_load_timeout=300,
        model_idle_timeout=300,
    ) as srv:
        yield srv


@pytest.mark.timeout(int(SOAK_SECONDS) + 600)
def test_soak_eviction_storm(soak_server: Server, jfk_flac: Path) -> None:
    clip = clip_wav(jfk_flac, 3.0)
    pauser = Pauser()
    outcomes: list[Outcome] = []
    crashes: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with soak_server.client(timeout=600) as client:
            while not stop.is_set():
                pauser.checkpoint()
                try:
                    if stop.is_set():
                        return
                    outcome = one_request(client, rng.choice(MODELS), clip, rng)
                    with lock:
                        outcomes.append(outcome)
                except BaseException as exc:  # reported by the test
                    crashes.append(exc)
                    return
                finally:
                    pauser.done()

    with soak_server.client(timeout=600) as control:
        workers = [
            threading.Thread(target=client_loop, args=(1000 + i,), daemon=True) for i in range(CLIENTS)
        ]
        started = time.monotonic()
        for w in workers:
            w.start()

        time.sleep(WARMUP_SECONDS)
        ran = time.monotonic() - started
        warm = settle_and_measure(soak_server, control, pauser)
        warm_requests = len(outcomes)
        pauser.resume()

        time.sleep(max(0.0, SOAK_SECONDS - ran))
        stop.set()
        end = settle_and_measure(soak_server, control, pauser)
        pauser.resume()
        for w in workers:
            w.join(600)
        metrics = scrape(control)
        ps = control.get("/api/ps").json()["models"]

    # --- report (visible with -s; also in the assertion messages below)
    per_model = Counter(o.model for o in outcomes)
    statuses = Counter(o.status for o in outcomes)
    latency: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        latency[o.model].append(o.seconds)
    figures: dict[str, Any] = {
        "soak_seconds": SOAK_SECONDS,
        "warmup_seconds": WARMUP_SECONDS,
        "requests": len(outcomes),
        "requests_after_warmup": len(outcomes) - warm_requests,
        "statuses": dict(statuses),
        "per_model": {
            m: {
                "requests": per_model[m],
                "median_s": round(statistics.median(latency[m]), 2) if latency[m] else None,
                "loads": total(metrics, "earshot_model_loads_total", model=m, outcome="success"),
                "load_failures": total(metrics, "earshot_model_loads_total", model=m, outcome="failure"),
                "load_timeouts": total(metrics, "earshot_model_loads_total", model=m, outcome="timeout"),
                "evictions": total(metrics, "earshot_model_evictions_total", model=m),
                "reloads": total(metrics, "earshot_model_reloads_total", model=m),
                "loaded": total(metrics, "earshot_model_loaded", model=m),
            }
            for m in MODELS
        },
        "rss_mib_kokoro_only": (round(warm.rss / 2**20, 1), round(end.rss / 2**20, 1)),
        "rss_mib_no_model": (round(warm.rss_empty / 2**20, 1), round(end.rss_empty / 2**20, 1)),
        "footprint_mib": footprints_mib(soak_server),
        "threads": (warm.threads, end.threads),
        "fds": (warm.fds, end.fds),
    }
    print("\nsoak figures:", figures)

    assert not crashes, crashes
    assert soak_server.alive()
    assert len(outcomes) >= 3 * len(MODELS), figures  # every model served, again and again
    assert all(per_model[m] > 0 for m in MODELS), figures
    assert not [o for o in outcomes if o.status >= 500], (
        figures,
        [o for o in outcomes if o.status >= 500][:5],
    )
    wrong = [o for o in outcomes if o.problem is not None]
    assert not wrong, (figures, wrong[:5])

    for m in MODELS:
        loads = total(metrics, "earshot_model_loads_total", model=m, outcome="success")
        evictions = total(metrics, "earshot_model_evictions_total", model=m)
        loaded = total(metrics, "earshot_model_loaded", model=m)
        assert loads - evictions == loaded, (m, figures)
        assert total(metrics, "earshot_model_loads_total", model=m, outcome="timeout") == 0, figures
    assert sum(figures["per_model"][m]["evictions"] for m in MODELS) >= len(MODELS), figures  # a storm
    assert [m["model"] for m in ps] == [KOKORO]  # as settle_and_measure left it
    assert all(m["in_use"] == 0 for m in ps)

    assert abs(end.rss - warm.rss) <= RSS_TOLERANCE * warm.rss, figures
    assert end.rss_empty - warm.rss_empty <= EMPTY_RSS_TOLERANCE * warm.rss_empty, figures  # no growth
    for m, loads in figures["footprint_mib"].items():  # a stable figure: budgets rest on it
        settled = [f for f, _ in loads[FOOTPRINT_SETTLED_AFTER:]]
        # Judged on long runs only (`make soak`): a 60 s run in CI has a handful of readings per model,
        # and one that still settles (base 88.5 -> 80.4 MiB over loads 5-8 once) is not instability.
        if settled and SOAK_SECONDS >= 180:
            middle = statistics.median(settled)
            assert all(abs(f - middle) <= FOOTPRINT_TOLERANCE * middle for f in settled), (m, figures)
    assert end.threads <= warm.threads + THREAD_SLACK, figures
    assert end.fds <= warm.fds + FD_SLACK, figures
    errors = [line for line in soak_server.log_lines() if line.get("level") in ("error", "critical")]
    assert not errors, errors[:3]
