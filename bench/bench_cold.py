"""3. Cold load: a model loaded by the server on first use, against WhisperModel(...) built directly."""

from __future__ import annotations

import time

from bench import direct
from bench.common import (
    JFK,
    STT_MODEL,
    BenchResult,
    Context,
    earshot_server,
    log,
    median,
    median_ratio_row,
    metric_delta,
    quiesce,
    scrape,
    summary,
    transcribe,
    unload_model,
)
from earshot.cache.memory import release_memory

NAME = "cold"
TITLE = "Cold load (tiny.en)"
TARGET = 1.10
METHOD = f"""\
Each round: `DELETE /api/ps/{STT_MODEL}` (then /api/ps polled until the model is gone: the unload,
gc and malloc_trim are finished and untimed), then two transcriptions of jfk.flac back to back: the
first loads the model (cold), the second finds it loaded (warm).
earshot load: the load duration the server reports, i.e. the increase of
earshot_model_load_duration_seconds_sum over the round (the cache times backend.load in its worker
thread: WhisperModel construction plus the memory measurement around it), read from /metrics.
earshot first-request penalty: (cold request time) - (warm request time) of the same round, both
client wall times: what a client pays for the load, everything included (the cache's bookkeeping,
footprint estimate, thread hand-offs, a new model's first inference).
direct load: wall time of `WhisperModel(path, device=auto->resolved, compute_type="auto",
cpu_threads=0, num_workers=1, local_files_only=True)` in the benchmark process (the constructor
WhisperBackend.load calls, same arguments), after the previous instance was dropped and the memory
released as earshot's unload releases it (gc.collect() and malloc_trim(0): without the trim the
direct side reuses the heap pages of the model it just dropped, while earshot's load pages its memory
in again, about 60 ms of the difference on a 2-core machine). Then two transcriptions of jfk.flac on the new model (as in the stt benchmark): direct
first-use penalty = construction + first transcription - second transcription (a new model's first
inference is slower on its own: allocations, page faults; this keeps that out of earshot's bill).
The rounds alternate which side goes first; one untimed round first on both sides (imports, page
cache). Ratios = medians over rounds: earshot load / direct load (the target), and earshot
first-request penalty / direct first-use penalty (same target)."""


def run(ctx: Context) -> BenchResult:
    rounds = ctx.reps(10, 3)
    audio = JFK.read_bytes()
    result = BenchResult(NAME, TITLE, METHOD)
    labels = {"model": STT_MODEL, "task": "transcription"}
    server_load: list[float] = []
    penalty: list[float] = []
    cold_req: list[float] = []
    warm_req: list[float] = []
    lib: list[float] = []
    lib_penalty: list[float] = []

    def direct_round() -> tuple[float, float]:
        """(construction time, construction + first transcription - second transcription)."""
        quiesce()
        start = time.perf_counter()
        model = direct.load_whisper(STT_MODEL)
        built = time.perf_counter()
        direct.transcribe_file(model, JFK)
        first = time.perf_counter()
        direct.transcribe_file(model, JFK)
        second = time.perf_counter()
        del model
        # as earshot's unload does: gc, then malloc_trim, so the next construction starts, like the
        # server's next load, from memory given back to the OS (pages fault in again) rather than
        # from a heap that still holds the last model's pages
        release_memory()
        quiesce()
        return built - start, (first - start) - (second - first)

    with earshot_server(ctx, NAME) as server, server.client() as client:
        log(f"{rounds} rounds (+1 untimed) of unload / cold request / warm request, and direct construction")
        for i in range(rounds + 1):
            first_direct = i % 2 == 1
            d = (float("nan"), float("nan"))
            if first_direct:
                d = direct_round()
            unload_model(client, STT_MODEL)
            before = scrape(client)
            start = time.perf_counter()
            transcribe(client, audio)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            transcribe(client, audio)
            warm = time.perf_counter() - start
            after = scrape(client)
            if not first_direct:
                d = direct_round()
            loads = metric_delta(before, after, "earshot_model_loads_total", outcome="success", **labels)
            load_s = metric_delta(before, after, "earshot_model_load_duration_seconds_sum", **labels)
            if loads != 1:
                raise RuntimeError(f"round {i}: expected 1 load of {STT_MODEL}, /metrics counted {loads}")
            if i == 0:
                continue  # warm-up round
            server_load.append(load_s)
            cold_req.append(cold)
            warm_req.append(warm)
            penalty.append(cold - warm)
            lib.append(d[0])
            lib_penalty.append(d[1])
    result.rows.append(
        median_ratio_row(
            NAME,
            "model load (server-reported), median",
            server_load,
            lib,
            TARGET,
            f"{rounds} rounds; earshot_model_load_duration_seconds vs WhisperModel(...)",
        )
    )
    result.rows.append(
        median_ratio_row(
            NAME,
            "first-request penalty (cold - warm), median",
            penalty,
            lib_penalty,
            TARGET,
            f"cold request {median(cold_req) * 1000:.0f} ms, warm {median(warm_req) * 1000:.0f} ms; "
            "direct: construction + first - second transcription",
        )
    )
    result.details = {
        "model": STT_MODEL,
        "rounds": rounds,
        "server_load_s": summary(server_load),
        "first_request_penalty_s": summary(penalty),
        "cold_request_s": summary(cold_req),
        "warm_request_s": summary(warm_req),
        "direct_construct_s": summary(lib),
        "direct_first_use_penalty_s": summary(lib_penalty),
        "target": TARGET,
        "samples_server_load_s": server_load,
        "samples_penalty_s": penalty,
        "samples_direct_s": lib,
        "samples_direct_penalty_s": lib_penalty,
    }
    return result
