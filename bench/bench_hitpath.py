"""5. Cache hit path: the runner's wrapper of bench_cache_hitpath (the cache engineer's benchmark)."""

from __future__ import annotations

from bench import bench_cache_hitpath
from bench.common import BenchResult, Context, Row, log

NAME = "hitpath"
TITLE = "Cache hit path (acquire + release of a loaded model)"
TARGET_P99_US = bench_cache_hitpath.TARGET_P99_US
METHOD = f"""\
bench/bench_cache_hitpath.py: on a real event loop with the real clock, a ModelCache with a trivial
in-process backend and the model already loaded; each timed iteration is one
`async with cache.acquire(model): pass` (enter and exit, nothing inside), timed with
perf_counter_ns; GC stays on. Run twice: no observers, then one no-op observer (the least the
metrics observer adds: building the Hit event). Median and p99 over the iterations; target p99 <
{TARGET_P99_US:g} µs for both. No server, no HTTP: the cache alone."""


def run(ctx: Context) -> BenchResult:
    iterations = ctx.reps(100_000, 10_000)
    result = BenchResult(NAME, TITLE, METHOD)
    log(f"{iterations} acquire+release iterations, without and with an observer")
    profiler = None
    if ctx.profiling(NAME):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0001, async_mode="disabled")
        profiler.start()
    try:
        r = bench_cache_hitpath.run(iterations)
    finally:
        if profiler is not None:
            profiler.stop()
            from bench.profiling import write_profile

            result.profile_files = write_profile(profiler, ctx.profile_base(NAME))
    for label, key in (("no observer", ""), ("one observer", "_with_observer")):
        result.rows.append(
            Row(
                NAME,
                f"acquire+release p99, {label}",
                r["p99_us" + key],
                "µs",
                target=TARGET_P99_US,
                target_text=f"p99 < {TARGET_P99_US:g} µs",
                note=f"median {r['median_us' + key]:.2f} µs, max {r['max_us' + key]:.0f} µs, n={iterations}",
            )
        )
    result.details = r
    return result
