"""7. Throughput and latency at 1, 2, 4, 8 concurrent clients; event-loop lag seen from outside."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import httpx

from bench.common import (
    JFK,
    STT_MODEL,
    BenchResult,
    Context,
    Row,
    earshot_server,
    load_model,
    log,
    median,
    percentile,
    quiesce,
    summary,
    transcribe,
)

NAME = "throughput"
TITLE = "Throughput vs concurrency (tiny.en, jfk.flac, json)"
LEVELS = (1, 2, 4, 8)
PROBE_INTERVAL_S = 0.05
LAG_TARGET_P99_MS = 20.0
METHOD = f"""\
For each level c in {LEVELS}: c client threads, each with its own kept-alive httpx client, send
transcriptions of jfk.flac ({STT_MODEL}, json) back to back until the level's request count is done.
requests/s = requests completed / (wall time from the start to the last response); latency = each
request's client wall time (p50, p95). The server runs its defaults (one uvicorn worker,
inference_concurrency 1 per model: inferences of one model run one at a time, in a worker thread).
Event-loop lag, from outside: a separate process (so the load generator's GIL does not delay it)
sends `GET /health` every {PROBE_INTERVAL_S * 1000:g} ms on its own connection during each level and
records each request's latency. /health is an async handler that only reads a flag, so its latency
is loop lag plus a constant HTTP round trip; the idle latency (probe run before any load) is that
constant, and the table reports lag = latency under load - idle median. Target p99 < {LAG_TARGET_P99_MS:g} ms.
For reference the probe also records how late its own sleeps wake up: when that is as large as the
lag, the delay is the machine's CPU contention (inference threads on every core), not the loop.
There is no in-process lag gauge in earshot (one would be the clean inside measure)."""


def _probe(url: str, interval: float, stop: Any, out: Any) -> None:
    """In a child process: GET /health every `interval` until `stop` is set; send the latencies (s)
    and how late the probe's own sleeps woke up (the machine's scheduling delay, for reference)."""
    samples: list[float] = []
    late: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/health")
        next_at = time.perf_counter()
        while not stop.is_set():
            start = time.perf_counter()
            try:
                client.get("/health").raise_for_status()
                samples.append(time.perf_counter() - start)
            except httpx.HTTPError:
                samples.append(float("nan"))
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                before = time.perf_counter()
                time.sleep(delay)
                late.append(max(0.0, time.perf_counter() - before - delay))
            else:
                next_at = time.perf_counter()
    out.send((samples, late))
    out.close()


class LagProbe:
    """Runs `_probe` in a spawned process for the duration of a `with` block."""

    def __init__(self, url: str, interval: float = PROBE_INTERVAL_S) -> None:
        mp = multiprocessing.get_context("spawn")
        self._stop = mp.Event()
        self._recv, send = mp.Pipe(duplex=False)
        self._proc = mp.Process(target=_probe, args=(url, interval, self._stop, send), daemon=True)
        self.samples: list[float] = []
        self.self_late: list[float] = []

    def __enter__(self) -> LagProbe:
        self._proc.start()
        time.sleep(0.5)  # let the child start and connect before the load does
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            if self._recv.poll(60):
                samples, late = self._recv.recv()
                self.samples = [s for s in samples if s == s]  # NaN: a failed probe request
                self.self_late = late
        finally:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()


def _level(url: str, audio: bytes, clients: int, total: int) -> dict[str, Any]:
    conns = [httpx.Client(base_url=url, timeout=600) for _ in range(clients)]
    for c in conns:
        c.get("/health").raise_for_status()
    lock = threading.Lock()
    remaining = [total]
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def worker(client: httpx.Client) -> None:
        barrier.wait()
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            start = time.perf_counter()
            try:
                transcribe(client, audio)
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in conns:
        c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed at concurrency {clients}; first: {errors[0]!r}")
    return {"wall_s": wall, "latencies_s": latencies}


def run(ctx: Context) -> BenchResult:
    audio = JFK.read_bytes()
    result = BenchResult(NAME, TITLE, METHOD)
    levels: list[dict[str, Any]] = []
    with earshot_server(ctx, NAME) as server, server.client() as client:
        load_model(client, STT_MODEL)
        for _ in range(ctx.reps(2, 1)):
            transcribe(client, audio)
        log("idle /health latency (2 s)")
        with LagProbe(server.url) as idle_probe:
            time.sleep(2.0)
        idle = idle_probe.samples
        idle_median = median(idle)
        for c in LEVELS:
            total = ctx.reps(max(16, 4 * c), max(4, 2 * c))
            log(f"concurrency {c}: {total} requests")
            quiesce()
            with LagProbe(server.url) as probe:
                level = _level(server.url, audio, c, total)
            lat = level["latencies_s"]
            lag = [max(0.0, s - idle_median) for s in probe.samples]
            levels.append(
                {
                    "concurrency": c,
                    "requests": len(lat),
                    "wall_s": level["wall_s"],
                    "requests_per_s": len(lat) / level["wall_s"],
                    "latency_p50_ms": median(lat) * 1000,
                    "latency_p95_ms": percentile(lat, 95) * 1000,
                    "latency_max_ms": max(lat) * 1000,
                    "health_samples": len(probe.samples),
                    "health_latency_ms": summary(probe.samples, 1000),
                    "loop_lag_p50_ms": median(lag) * 1000,
                    "loop_lag_p99_ms": percentile(lag, 99) * 1000,
                    "loop_lag_max_ms": (max(lag) if lag else float("nan")) * 1000,
                    "probe_wakeup_late_p99_ms": percentile(probe.self_late, 99) * 1000,
                }
            )
    for lv in levels:
        result.rows.append(
            Row(
                NAME,
                f"c={lv['concurrency']}: event-loop lag p99",
                lv["loop_lag_p99_ms"],
                "ms",
                target=LAG_TARGET_P99_MS,
                target_text=f"p99 < {LAG_TARGET_P99_MS:g} ms",
                note=f"{lv['requests_per_s']:.2f} req/s, latency p50 {lv['latency_p50_ms']:.0f} ms, "
                f"p95 {lv['latency_p95_ms']:.0f} ms ({lv['requests']} requests, "
                f"{lv['health_samples']} /health samples)",
            )
        )
    result.detail_table = [
        {
            "clients": lv["concurrency"],
            "requests": lv["requests"],
            "req/s": f"{lv['requests_per_s']:.2f}",
            "p50 ms": f"{lv['latency_p50_ms']:.0f}",
            "p95 ms": f"{lv['latency_p95_ms']:.0f}",
            "max ms": f"{lv['latency_max_ms']:.0f}",
            "loop lag p50 ms": f"{lv['loop_lag_p50_ms']:.1f}",
            "loop lag p99 ms": f"{lv['loop_lag_p99_ms']:.1f}",
            "loop lag max ms": f"{lv['loop_lag_max_ms']:.1f}",
            "probe's own wake-up late p99 ms": f"{lv['probe_wakeup_late_p99_ms']:.1f}",
        }
        for lv in levels
    ]
    result.details = {
        "model": STT_MODEL,
        "idle_health_latency_ms": summary(idle, 1000),
        "levels": levels,
        "probe_interval_s": PROBE_INTERVAL_S,
    }
    return result
