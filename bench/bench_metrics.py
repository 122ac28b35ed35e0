"""6. /metrics scrape cost with a 50-model catalog, 10 models loaded (in process, fake backend)."""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Context, Row, log, summary

NAME = "metrics"
TITLE = "/metrics scrape, 50 catalog models, 10 loaded"
TARGET_P99_MS = 10.0
TARGET_LOOP_MS = 1.0
CATALOG = 50
LOADED = 10
SPEECH_MODELS = 10  # of the 50, the rest are transcription models
METHOD = f"""\
In process: the real app (create_app, real Observability: cache metrics, state collector, HTTP
metrics middleware, GC/process/platform collectors) over a models directory of {CATALOG} fake model
directories ({CATALOG - SPEECH_MODELS} transcription, {SPEECH_MODELS} speech), with a fake backend
(tests/support/fakes.py FakeBackend) so loading is free: what is measured is the scrape, not models.
Two scenarios, measured one after the other in the same app: A) {LOADED} models loaded, each
with a little history (a load, hits, an inference recorded), the other {CATALOG - LOADED} never
used (their only series: earshot_model_loaded 0); B) then every other model loaded, used and
unloaded again, so every per-model series (counters, load and inference histograms, evictions)
exists, as on a server that has used its whole catalog, {LOADED} still loaded. Log level WARNING
(no per-request log line).
generate_latest: wall time of `prometheus_client.generate_latest(registry)` (collect + format: the
whole cost of a scrape).
on the event loop: wall time of `cache.snapshot()`, the only part of a scrape the /metrics handler
runs on the event loop thread (every collector and the formatting run in a worker thread): how
long a scrape stalls other requests. Target: p99 < {TARGET_LOOP_MS:g} ms.
GET /metrics: wall time of one request through Litestar's ASGI stack (routing, middleware, the
handler) with litestar.testing.AsyncTestClient: no socket, but includes the in-process httpx client.
The two are interleaved; median and p99. Target: p99 < {TARGET_P99_MS:g} ms for both."""


def _models_dir(root: Path) -> list[str]:
    ids = []
    for i in range(CATALOG):
        speech = i < SPEECH_MODELS
        model_id = f"bench-{'tts' if speech else 'stt'}-{i:02d}"
        d = root / model_id
        d.mkdir()
        if speech:
            (d / "model.onnx").write_bytes(b"\0" * 64)
            (d / "voices.npz").write_bytes(b"\0" * 64)
        else:
            (d / "model.bin").write_bytes(b"\0" * 64)
            (d / "config.json").write_text("{}")
        ids.append(model_id)
    return ids


async def _timings(
    registry: Any, cache: Any, client: Any, n: int
) -> tuple[list[float], list[float], list[float], bytes]:
    """n interleaved timings of generate_latest, GET /metrics and the event-loop step alone."""
    from prometheus_client import generate_latest

    for _ in range(50):  # warm-up
        generate_latest(registry)
        (await client.get("/metrics")).raise_for_status()
    gen: list[float] = []
    http: list[float] = []
    loop: list[float] = []
    clock = time.perf_counter
    gc.collect()
    for i in range(n):
        for which in ("gen", "http", "loop") if i % 2 == 0 else ("loop", "http", "gen"):
            start = clock()
            if which == "gen":
                generate_latest(registry)
                gen.append(clock() - start)
            elif which == "loop":
                cache.snapshot()
                loop.append(clock() - start)
            else:
                await client.get("/metrics")
                http.append(clock() - start)
    r = await client.get("/metrics")
    r.raise_for_status()
    return gen, http, loop, r.content


async def _history(app: Any, model_id: str) -> None:
    """One model's life so far: a load, a few hits, an inference recorded."""
    cache = app.state["cache"]
    await cache.load(model_id)
    for _ in range(3):
        async with cache.acquire(model_id):
            pass
    task = app.state["services"].catalog.resolve(model_id).task.value
    app.state["observability"].record_inference(model=model_id, task=task, duration_s=0.5, audio_s=11.0)


def _phase(label: str, gen: list[float], http: list[float], loop: list[float], body: bytes) -> dict[str, Any]:
    samples = [line for line in body.decode().splitlines() if line and not line.startswith("#")]
    return {
        "scenario": label,
        "generate_latest_ms": summary(gen, 1000),
        "http_get_ms": summary(http, 1000),
        "snapshot_on_loop_ms": summary(loop, 1000),
        "exposition_bytes": len(body),
        "exposition_samples": len(samples),
        "earshot_samples": sum(1 for s in samples if s.startswith("earshot_")),
    }


async def _measure(ctx: Context, root: Path) -> dict[str, Any]:
    from litestar.testing import AsyncTestClient

    from earshot.main import create_app
    from earshot.settings import Settings

    ids = _models_dir(root)
    settings = Settings(models_dir=root, builtin_hub_models=False, log_level="WARNING")
    from tests.support.fakes import FakeBackend  # bench/ runs from a checkout, tests/ beside it

    backend = FakeBackend(footprint=100 * 1024 * 1024)
    app = create_app(settings, backends={"transcription": backend, "speech": backend})
    services = app.state["services"]
    cache = app.state["cache"]
    registry = app.state["observability"].registry
    catalog_ids = services.catalog.ids()
    if sorted(ids) != catalog_ids:
        raise RuntimeError(f"catalog is not the {CATALOG} bench models: {catalog_ids}")
    n = ctx.reps(1000, 200)
    phases = []
    async with AsyncTestClient(app=app) as client:
        for path in ("/health", "/v1/models", "/api/ps"):
            (await client.get(path)).raise_for_status()
        # A: only the loaded models were ever used (per-model counters/histograms exist for them).
        for model_id in ids[:LOADED]:
            await _history(app, model_id)
        phases.append(
            _phase(f"{LOADED} loaded, only they ever used", *await _timings(registry, cache, client, n))
        )
        # B: every catalog model was used once and all but LOADED evicted again: the most series.
        for model_id in ids[LOADED:]:
            await _history(app, model_id)
            await cache.unload(model_id)
        phases.append(
            _phase(f"{LOADED} loaded, all {CATALOG} used before", *await _timings(registry, cache, client, n))
        )
        loaded = [m.id for m in cache.snapshot().models if m.loaded]
        if len(loaded) != LOADED:
            raise RuntimeError(f"expected {LOADED} loaded models, the cache holds {loaded}")
    return {
        "iterations": n,
        "catalog_models": CATALOG,
        "loaded_models": LOADED,
        "backend": type(backend).__name__,
        "phases": phases,
    }


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME, TITLE, METHOD)
    log(f"building the app with {CATALOG} catalog models, {LOADED} loaded (fake backend)")
    profiler = None
    if ctx.profiling(NAME):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    try:
        with tempfile.TemporaryDirectory(prefix="earshot-bench-metrics-") as tmp:
            details = asyncio.run(_measure(ctx, Path(tmp)))
    finally:
        if profiler is not None:
            profiler.stop()
            from bench.profiling import write_profile

            result.profile_files = write_profile(profiler, ctx.profile_base(NAME))
    for phase in details["phases"]:
        for metric, key in (
            ("generate_latest", "generate_latest_ms"),
            ("GET /metrics (ASGI)", "http_get_ms"),
        ):
            st = phase[key]
            result.rows.append(
                Row(
                    NAME,
                    f"{metric} p99 [{phase['scenario']}]",
                    st["p99"],
                    "ms",
                    target=TARGET_P99_MS,
                    target_text=f"p99 < {TARGET_P99_MS:g} ms",
                    note=f"median {st['median']:.2f} ms, n={st['n']}; {phase['exposition_samples']} samples, "
                    f"{phase['exposition_bytes'] / 1024:.0f} KiB",
                )
            )
        st = phase["snapshot_on_loop_ms"]
        result.rows.append(
            Row(
                NAME,
                f"on the event loop (snapshot) p99 [{phase['scenario']}]",
                st["p99"],
                "ms",
                target=TARGET_LOOP_MS,
                target_text=f"p99 < {TARGET_LOOP_MS:g} ms",
                note=f"median {st['median']:.3f} ms: the part of a scrape that blocks the loop",
            )
        )
    result.details = details
    return result
