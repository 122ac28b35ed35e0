"""Per-model figures of the demo models as the server sees them: load time, measured footprint (RSS
growth at load), and warm inference time (jfk.flac for the Whisper models, two sentences for Kokoro).
Not a comparison: the numbers an operator sizes `max_models` / `memory_budget_bytes` with."""

from __future__ import annotations

import time

from bench.common import (
    JFK,
    BenchResult,
    Context,
    Row,
    earshot_server,
    load_model,
    log,
    median,
    metric,
    metric_delta,
    scrape,
    speech,
    transcribe,
    unload_model,
)

NAME = "models"
TITLE = "Demo models: load time, footprint, warm inference"
MODELS = ("faster-whisper-tiny.en", "faster-whisper-base", "kokoro-82m-v1.0-int8")
TEXT = "Hello world. The quick brown fox jumps over the lazy dog."
METHOD = """\
One server; for each demo model in turn (only that model loaded): `POST /api/ps/{id}` loads it.
load time: the increase of earshot_model_load_duration_seconds_sum (the cache times backend.load in
its worker thread). footprint: `size_bytes` of /api/ps, the RSS growth the cache measured around the
load. Then warm inference, median over the repetitions: earshot_inference_duration_seconds (the
server's own time in the worker thread) of jfk.flac (json) for Whisper, of the two-sentence text
(wav) for Kokoro; plus the RSS after the first inference (Kokoro's runtime grows at its first run).
The model is unloaded before the next one."""


def _rss(client: object) -> float:
    exposition = scrape(client)  # type: ignore[arg-type]
    return metric(exposition, "process_resident_memory_bytes")


def run(ctx: Context) -> BenchResult:
    reps = ctx.reps(5, 2)
    audio = JFK.read_bytes()
    result = BenchResult(NAME, TITLE, METHOD)
    with earshot_server(ctx, NAME) as server, server.client() as client:
        for model in MODELS:
            task = "speech" if model.startswith("kokoro") else "transcription"
            labels = {"model": model, "task": task}
            before = scrape(client)
            load_model(client, model)
            load_s = metric_delta(before, scrape(client), "earshot_model_load_duration_seconds_sum", **labels)
            ps = {m["model"]: m for m in client.get("/api/ps").json()["models"]}
            footprint = float(ps[model]["size_bytes"])
            rss_loaded = _rss(client)
            times = []
            for _ in range(reps + 1):
                exp = scrape(client)
                start = time.perf_counter()
                if task == "speech":
                    speech(client, TEXT, "alloy", model=model)
                else:
                    transcribe(client, audio, model=model)
                wall = time.perf_counter() - start
                inference = metric_delta(
                    exp, scrape(client), "earshot_inference_duration_seconds_sum", **labels
                )
                times.append((inference, wall))
            rss_used = _rss(client)
            warm = times[1:]
            inference = median([t for t, _ in warm])
            request = median([w for _, w in warm])
            log(
                f"{model}: load {load_s * 1000:.0f} ms, footprint {footprint / 2**20:.0f} MiB, "
                f"inference {inference * 1000:.0f} ms"
            )
            what = "jfk.flac" if task == "transcription" else "2 sentences"
            result.rows += [
                Row(NAME, f"{model}: load time", load_s * 1000, "ms"),
                Row(
                    NAME,
                    f"{model}: footprint (RSS at load)",
                    footprint / 2**20,
                    "MiB",
                    note=f"process RSS {rss_loaded / 2**20:.0f} MiB loaded, {rss_used / 2**20:.0f} MiB after inference",
                ),
                Row(
                    NAME,
                    f"{model}: warm inference, {what}",
                    inference * 1000,
                    "ms",
                    note=f"request wall time {request * 1000:.0f} ms (median of {len(warm)})",
                ),
            ]
            result.details[model] = {
                "load_s": load_s,
                "footprint_bytes": footprint,
                "inference_s": inference,
                "request_s": request,
                "rss_loaded": rss_loaded,
                "rss_used": rss_used,
            }
            unload_model(client, model)
    return result
