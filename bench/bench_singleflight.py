"""4. Single flight: N concurrent first requests for one cold model make exactly one load."""

from __future__ import annotations

import threading
import time

import httpx

from bench.common import (
    JFK,
    STT_MODEL,
    BenchResult,
    Context,
    Row,
    earshot_server,
    log,
    median,
    metric_delta,
    quiesce,
    scrape,
    summary,
    transcribe,
    unload_model,
)

NAME = "singleflight"
TITLE = "Single flight (concurrent first requests, tiny.en)"
METHOD = f"""\
Each round: `DELETE /api/ps/{STT_MODEL}` (waited until gone), then N client threads, each with its own
httpx client whose connection is already open, released together by a barrier, each sending one
transcription of jfk.flac. earshot: wall time from the release to the last response.
Loads counted from /metrics: the increase of earshot_model_loads_total{{model, outcome="success"}}
over the burst (must be 1), with the cache's miss/coalesced request counters.
baseline: (the load duration the server reported for that burst's load, from
earshot_model_load_duration_seconds) + (N sequential warm transcriptions on one client, timed right
after the burst). Ratio = burst wall / baseline: about 1 when the requests that coalesced on the load
then run one after another (inference_concurrency 1, the default); no target, the check is loads == 1.
All requests must answer 200 with the same text."""


def _burst(url: str, n: int, audio: bytes) -> tuple[float, list[float], list[str]]:
    clients = [httpx.Client(base_url=url, timeout=600) for _ in range(n)]
    for c in clients:
        c.get("/health").raise_for_status()  # open the connection now, not inside the burst
    barrier = threading.Barrier(n + 1)
    latencies = [0.0] * n
    texts = [""] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            texts[i] = transcribe(clients[i], audio)["text"]
        except BaseException as exc:
            errors.append(exc)
        latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} concurrent requests failed; first: {errors[0]!r}")
    return wall, latencies, texts


def run(ctx: Context) -> BenchResult:
    n = ctx.reps(32, 8)
    rounds = ctx.reps(2, 1)
    audio = JFK.read_bytes()
    result = BenchResult(NAME, TITLE, METHOD)
    labels = {"model": STT_MODEL}
    walls: list[float] = []
    baselines: list[float] = []
    loads_per_burst: list[float] = []
    coalesced: list[float] = []
    misses: list[float] = []
    hits: list[float] = []
    lat_all: list[float] = []
    seq_all: list[float] = []
    load_all: list[float] = []
    with earshot_server(ctx, NAME) as server, server.client() as client:
        transcribe(client, audio)  # untimed: imports and first load, once
        for rnd in range(rounds):
            unload_model(client, STT_MODEL)
            quiesce()
            before = scrape(client)
            log(f"round {rnd + 1}/{rounds}: {n} concurrent first requests")
            wall, latencies, texts = _burst(server.url, n, audio)
            after = scrape(client)

            def delta(sample: str, after: str = after, before: str = before, **extra: str) -> float:
                return metric_delta(before, after, sample, **labels, **extra)

            loads = delta("earshot_model_loads_total", outcome="success")
            load_s = delta("earshot_model_load_duration_seconds_sum")
            coalesced.append(delta("earshot_cache_requests_total", result="coalesced"))
            misses.append(delta("earshot_cache_requests_total", result="miss"))
            hits.append(delta("earshot_cache_requests_total", result="hit"))
            if len(set(texts)) != 1:
                raise RuntimeError(f"the concurrent requests answered different texts: {set(texts)}")
            log(f"round {rnd + 1}/{rounds}: {n} sequential warm requests")
            seq: list[float] = []
            for _ in range(n):
                start = time.perf_counter()
                transcribe(client, audio)
                seq.append(time.perf_counter() - start)
            walls.append(wall)
            baselines.append(load_s + sum(seq))
            loads_per_burst.append(loads)
            lat_all.extend(latencies)
            seq_all.extend(seq)
            load_all.append(load_s)
    all_one = all(x == 1 for x in loads_per_burst)
    result.rows.append(
        Row(
            NAME,
            f"loads for {n} concurrent cold requests",
            max(loads_per_burst),
            "loads",
            target_text="== 1",
            ok_override=all_one,
            note=f"per round {loads_per_burst}; cache requests: miss {misses}, coalesced {coalesced}, "
            f"hit {hits} (arrived after the load finished)",
        )
    )
    result.rows.append(
        Row(
            NAME,
            f"burst wall time vs load + {n} sequential warm",
            median(walls),
            "s",
            baseline=median(baselines),
            note=f"load {median(load_all) * 1000:.0f} ms; burst request p50 {median(lat_all):.1f} s, "
            f"max {max(lat_all):.1f} s",
        )
    )
    result.details = {
        "model": STT_MODEL,
        "concurrency": n,
        "rounds": rounds,
        "loads_per_burst": loads_per_burst,
        "miss_per_burst": misses,
        "coalesced_per_burst": coalesced,
        "hit_per_burst": hits,
        "burst_wall_s": walls,
        "baseline_s": baselines,
        "server_load_s": load_all,
        "burst_request_latency_s": summary(lat_all),
        "sequential_warm_request_s": summary(seq_all),
        "ok": all_one,
    }
    return result
