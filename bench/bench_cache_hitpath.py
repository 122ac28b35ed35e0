"""Hit-path latency of the model cache: acquire + release of a model that is already loaded.

    .venv/bin/python bench/bench_cache_hitpath.py [iterations]

Times each `async with cache.acquire(model)` block (enter and exit, nothing inside) on a real event
loop with the real clock and a trivial in-process backend, first without observers, then with one
no-op observer (what the metrics observer adds at least: building the Hit event). Prints the
median and p99 in microseconds; the target is p99 < 50 µs. `run()` returns the figures as a dict
for a bench runner.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
from typing import Any

from earshot.cache.events import CacheEvent
from earshot.cache.manager import ModelCache
from earshot.cache.protocol import ModelSpec, Task
from earshot.cache.state import CacheConfig

TARGET_P99_US = 50.0
MODEL = "bench/model"


class _Backend:
    """Loads nothing: the hit path never calls the backend anyway."""

    def load(self, spec: ModelSpec) -> object:
        return object()

    def unload(self, handle: Any) -> None:
        pass

    def footprint(self, spec: ModelSpec) -> int:
        return 1


def _noop(event: CacheEvent) -> None:
    pass


async def _measure(iterations: int, *, observed: bool) -> list[int]:
    spec = ModelSpec(id=MODEL, task=Task.TRANSCRIPTION, source="local")
    cache = ModelCache(
        lambda model_id: spec if model_id == MODEL else None,
        {Task.TRANSCRIPTION.value: _Backend()},
        CacheConfig(idle_timeout=300),
        observers=[_noop] if observed else [],
        release_memory=lambda: None,
    )
    await cache.load(MODEL)
    for _ in range(min(10_000, iterations)):  # warm up
        async with cache.acquire(MODEL):
            pass
    samples = [0] * iterations
    clock = time.perf_counter_ns
    gc.collect()  # start clean; the collector stays on, its pauses are part of the figures
    for i in range(iterations):
        start = clock()
        async with cache.acquire(MODEL):
            pass
        samples[i] = clock() - start
    await cache.close()
    return samples


def _percentile(sorted_ns: list[int], fraction: float) -> float:
    index = min(len(sorted_ns) - 1, round(fraction * (len(sorted_ns) - 1)))
    return sorted_ns[index] / 1000.0


def run(iterations: int = 100_000) -> dict[str, Any]:
    """Run the benchmark; figures in microseconds."""
    results: dict[str, Any] = {"iterations": iterations, "target_p99_us": TARGET_P99_US}
    for label, observed in (("", False), ("_with_observer", True)):
        samples = sorted(asyncio.run(_measure(iterations, observed=observed)))
        results[f"median_us{label}"] = statistics.median(samples) / 1000.0
        results[f"p99_us{label}"] = _percentile(samples, 0.99)
        results[f"max_us{label}"] = samples[-1] / 1000.0
    results["ok"] = results["p99_us"] < TARGET_P99_US and results["p99_us_with_observer"] < TARGET_P99_US
    return results


def main() -> int:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    r = run(iterations)
    print(f"cache hit path: acquire + release of a loaded model, {r['iterations']} iterations")
    for label, key in (("no observers", ""), ("one observer", "_with_observer")):
        print(f"  {label}:  median {r['median_us' + key]:.2f} µs   p99 {r['p99_us' + key]:.2f} µs")
    print(f"  target p99 < {r['target_p99_us']:.0f} µs: {'ok' if r['ok'] else 'MISSED'}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
