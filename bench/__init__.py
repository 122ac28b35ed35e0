"""earshot's benchmarks (`python -m bench`, `make bench`): each measures earshot and its baseline in
one run on the same machine and prints the ratio. Not part of `make test`. See bench/README.md."""

from __future__ import annotations

import importlib
from types import ModuleType

#: name -> (module, number in the brief), in the order they run. Each module has NAME, TITLE,
#: METHOD and run(ctx) -> BenchResult.
BENCHMARKS: dict[str, tuple[str, int]] = {
    "stt": ("bench.bench_stt", 1),
    "tts": ("bench.bench_tts", 2),
    "cold": ("bench.bench_cold", 3),
    "singleflight": ("bench.bench_singleflight", 4),
    "hitpath": ("bench.bench_hitpath", 5),
    "metrics": ("bench.bench_metrics", 6),
    "throughput": ("bench.bench_throughput", 7),
    "realtime": ("bench.bench_realtime", 8),
    "fleet": ("bench.bench_fleet", 9),
    # figures for the operators' notes, not comparisons
    "models": ("bench.bench_models", 0),
    "formats": ("bench.bench_formats", 0),
}


def load(module: str) -> ModuleType:
    return importlib.import_module(module)
