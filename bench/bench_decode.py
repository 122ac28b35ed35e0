"""Decode isolation cost: jfk.flac decoded in process (a worker thread) vs through the decode pool.

`.venv/bin/python -m bench.bench_decode` prints medians of N decodes each, alternating, and the
per-request extra of the pool (bytes to the worker, PCM back). Not part of `make test`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

from earshot.audio.pool import DecodePool, InProcessDecoder

JFK = Path(__file__).resolve().parents[1] / "tests" / "data" / "jfk.flac"


async def main(n: int) -> None:
    data = JFK.read_bytes()
    pool = DecodePool(2)
    await pool.warm()
    direct = InProcessDecoder()
    sides: dict[str, list[float]] = {"in_process": [], "pool": []}
    for i in range(n + 3):
        order = [("in_process", direct), ("pool", pool)]
        if i % 2:
            order.reverse()
        for name, decoder in order:
            t = time.perf_counter()
            await decoder.decode(data, sample_rate=16000, max_seconds=7200)
            if i >= 3:
                sides[name].append(time.perf_counter() - t)
    pool.close()
    a, b = statistics.median(sides["in_process"]), statistics.median(sides["pool"])
    print(
        f"jfk.flac decode, median of {n}: in process {a * 1e3:.1f} ms, pool {b * 1e3:.1f} ms, "
        f"extra {(b - a) * 1e3:.1f} ms per request"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30))
