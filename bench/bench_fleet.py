"""9. The fleet on Ray Serve against the single-process server, in one run: warm STT through the
fleet, loads under random traffic of 4 models on 2 workers x 2 models, the gateway's added latency,
and what the fleet's Ray processes take."""

from __future__ import annotations

import io
import random
import shutil
import tempfile
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    JFK,
    MODELS_DIR,
    STT_MODEL,
    TTS_MODEL,
    BenchResult,
    Context,
    Row,
    earshot_server,
    load_model,
    log,
    median,
    percentile,
    quiesce,
    transcribe,
)

NAME = "fleet"
TITLE = "Fleet on Ray Serve vs single server (2 workers)"
STT_TARGET = 1.10
BASE = "faster-whisper-base"
COPY = "faster-whisper-tiny.en-copy"
METHOD = f"""\
fleet: `earshot fleet` (a local Ray on 127.0.0.1 started by earshot, every port chosen), 2 workers x 2
models (fleet_models_per_worker 2), 1 CPU reserved per worker, on a models dir holding the demo
models plus a second copy of tiny.en imported under the id {COPY} (a distinct catalog id: its own
load). single: `earshot serve` on the demo models with cpu_threads 1: a worker's 1 reserved CPU
makes Ray set OMP_NUM_THREADS=1 in it, so its CTranslate2 runs one thread, and the single server
gets the same. Both answer on 127.0.0.1 over kept-alive httpx connections.
(1) warm STT: `POST /v1/audio/transcriptions` ({STT_MODEL}, jfk.flac, json), the model loaded on
both; timed calls alternate fleet/single (order flipped each iteration), medians; ratio = fleet /
single.
(2) loads: requests, one at a time, each for one of {STT_MODEL}, {BASE}, {COPY} (a 1 s clip,
transcribed) or {TTS_MODEL} (a short sentence, spoken) picked at random (seeded); loads = the
fleet's `model_loaded` events (from `/api/events`, each with its worker) over the run, on a fresh
fleet. Target: 4 (each model loaded once: Ray routes a model to the worker holding it).
(3) gateway added latency: `GET /health` through the fleet (Serve's HTTP proxy -> gateway replica)
against the single server, interleaved; p50 and p99 of each; the row is the p50 difference.
(4) memory: processes under the `earshot fleet` process (the driver, Ray's GCS, raylet, agents,
Serve's controller and proxy, the board, the gateway and worker replicas), RSS summed, with the
models of (2) loaded."""


def _clip(seconds: float = 1.0) -> bytes:
    """The first `seconds` of jfk.flac as 16 kHz WAV."""
    from earshot.audio.decode import decode_audio

    samples = decode_audio(JFK.read_bytes(), sample_rate=16000)[: int(16000 * seconds)]
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _models_dir(root: Path) -> Path:
    from earshot.models.importer import import_model

    models = root / "models"
    models.mkdir()
    for entry in MODELS_DIR.iterdir():  # the catalog refuses a symlinked model directory
        if entry.is_dir() and not entry.name.startswith("."):
            import_model(entry, models, link=True)
    import_model(MODELS_DIR / STT_MODEL, models, model_id=COPY, link=True)
    return models


def _ray_processes(pid: int) -> dict[str, Any]:
    procs = psutil.Process(pid).children(recursive=True)
    names: Counter[str] = Counter()
    rss: Counter[str] = Counter()
    for proc in procs:
        try:
            name = proc.cmdline()[0] if proc.cmdline() else proc.name()
            name = name.split("/")[-1].split(" ")[0]
            names[name] += 1
            rss[name] += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    driver = psutil.Process(pid).memory_info().rss
    return {
        "processes": sum(names.values()) + 1,
        "rss_bytes": sum(rss.values()) + driver,
        "by_name": {n: {"count": names[n], "rss_mib": round(rss[n] / 2**20)} for n in names},
        "driver_rss_mib": round(driver / 2**20),
    }


def _one(client: httpx.Client, model: str, clip: bytes) -> None:
    if model == TTS_MODEL:
        r = client.post(
            "/v1/audio/speech",
            json={"model": model, "input": "Hello there.", "voice": "alloy", "response_format": "wav"},
        )
    else:
        r = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("clip.wav", clip, "audio/wav")},
            data={"model": model, "response_format": "json"},
        )
    if r.status_code != 200:
        raise RuntimeError(f"{model}: {r.status_code} {r.text[:300]}")


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE, METHOD)
    n_stt = ctx.reps(20, 4)
    n_random = ctx.reps(200, 40)
    n_health = ctx.reps(300, 50)
    audio = JFK.read_bytes()
    clip = _clip()
    root = Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))
    try:
        models = _models_dir(root)
        fleet_env = {
            "RAY_TMPDIR": str(root),
            "fleet_workers": 2,
            "fleet_models_per_worker": 2,
            "fleet_cpus_per_worker": 1,
            "log_level": "WARNING",
            "shutdown_grace_seconds": 5,
        }
        log("starting the fleet (local Ray, 2 workers x 2 models) and the single server")
        started = time.perf_counter()
        with (
            earshot_server(
                ctx,
                NAME + "-fleet",
                command="fleet",
                models_dir=models,
                ready_timeout=300,
                stop_timeout=90,
                **fleet_env,
            ) as fleet,
            fleet.client() as fc,
        ):
            fleet_start_s = time.perf_counter() - started
            # (2) loads over random traffic, on the fresh fleet
            log(f"{n_random} requests of 4 models at random through the fleet")
            rng = random.Random(14)
            picks = [rng.choice([STT_MODEL, BASE, COPY, TTS_MODEL]) for _ in range(n_random)]
            started = time.perf_counter()
            for model in picks:
                _one(fc, model, clip)
            random_s = time.perf_counter() - started
            events = fc.get("/api/events").json()["events"]
            loads = Counter((e["model"], e["worker"]) for e in events if e["event"] == "model_loaded")
            n_loads = sum(loads.values())
            memory = _ray_processes(fleet.process.pid)
            ps = fc.get("/api/ps").json()
            placement = sorted((m["model"], m["worker"]) for m in ps["models"])
            result.rows.append(
                Row(
                    NAME,
                    f"model loads, {n_random} random requests of 4 models (2 workers x 2)",
                    n_loads,
                    "loads",
                    target=4,
                    target_text="== 4",
                    ok_override=n_loads == 4,
                    note=f"per model@worker {dict(sorted((f'{m}@{w}', c) for (m, w), c in loads.items()))}; "
                    f"{random_s / n_random * 1000:.0f} ms per request",
                )
            )
            result.rows.append(
                Row(
                    NAME,
                    "Ray processes under `earshot fleet`, RSS sum (4 models loaded)",
                    memory["rss_bytes"] / 2**20,
                    "MiB",
                    note=f"{memory['processes']} processes; fleet start to ready {fleet_start_s:.0f} s",
                )
            )
            result.details.update(
                {
                    "loads": {f"{m}@{w}": c for (m, w), c in loads.items()},
                    "placement": placement,
                    "memory": memory,
                    "fleet_start_s": fleet_start_s,
                    "random_requests": n_random,
                }
            )
            with (
                earshot_server(ctx, NAME + "-single", log_level="WARNING", cpu_threads=1) as single,
                single.client() as sc,
            ):
                # (1) warm STT
                load_model(sc, STT_MODEL)
                for _ in range(2):
                    transcribe(fc, audio)
                    transcribe(sc, audio)
                log(f"timing {n_stt} fleet + {n_stt} single transcriptions, interleaved")
                via_fleet: list[float] = []
                via_single: list[float] = []
                for i in range(n_stt):
                    quiesce()
                    for side in ("fleet", "single") if i % 2 == 0 else ("single", "fleet"):
                        client, into = (fc, via_fleet) if side == "fleet" else (sc, via_single)
                        start = time.perf_counter()
                        transcribe(client, audio)
                        into.append(time.perf_counter() - start)
                result.rows.append(
                    Row(
                        NAME,
                        "warm STT through the fleet, median",
                        median(via_fleet) * 1000,
                        "ms",
                        baseline=median(via_single) * 1000,
                        target=STT_TARGET,
                        target_text=f"ratio <= {STT_TARGET}",
                        note=f"n={n_stt} each; fleet p95 {percentile(via_fleet, 95) * 1000:.0f} ms, "
                        f"single p95 {percentile(via_single, 95) * 1000:.0f} ms",
                    )
                )
                # (3) gateway added latency on a trivial route
                log(f"timing {n_health} GET /health each way, interleaved")
                hf: list[float] = []
                hs: list[float] = []
                for i in range(n_health):
                    for side in ("fleet", "single") if i % 2 == 0 else ("single", "fleet"):
                        client, into = (fc, hf) if side == "fleet" else (sc, hs)
                        start = time.perf_counter()
                        client.get("/health").raise_for_status()
                        into.append(time.perf_counter() - start)
                p50f, p99f = percentile(hf, 50) * 1000, percentile(hf, 99) * 1000
                p50s, p99s = percentile(hs, 50) * 1000, percentile(hs, 99) * 1000
                result.rows.append(
                    Row(
                        NAME,
                        "gateway added latency, GET /health p50",
                        p50f - p50s,
                        "ms",
                        note=f"fleet p50 {p50f:.1f} / p99 {p99f:.1f} ms; single p50 {p50s:.1f} / p99 {p99s:.1f} ms; n={n_health}",
                    )
                )
                result.rows.append(
                    Row(
                        NAME,
                        "gateway added latency, GET /health p99",
                        p99f - p99s,
                        "ms",
                        note=f"n={n_health}",
                    )
                )
                result.details.update(
                    {
                        "stt_ms": {
                            "fleet": [x * 1000 for x in via_fleet],
                            "single": [x * 1000 for x in via_single],
                        },
                        "health_ms": {
                            "fleet_p50": p50f,
                            "fleet_p99": p99f,
                            "single_p50": p50s,
                            "single_p99": p99s,
                        },
                    }
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result
