"""`python -m bench [NAME ...] [--quick] [--profile NAME] [--out DIR]`: run the benchmarks, print
their tables, write results.json, results.md and the throughput plot. See bench/README.md."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import BENCHMARKS, load
from bench.common import RESULTS_DIR, BenchResult, Context, machine_info
from bench.report import plot_throughput, print_result, print_summary, write_json, write_markdown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="earshot benchmarks: each compares earshot with its baseline in one run and prints the ratio.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test, minutes)")
    parser.add_argument(
        "--profile",
        metavar="NAME",
        choices=list(BENCHMARKS),
        help="run benchmark NAME only, with its earshot side under pyinstrument; the profile goes to "
        "OUT/profile-NAME.html and .txt (timings of a profiled run are not saved as results)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where results go (default: bench/results, or bench/results/quick with --quick)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind: every server context manager stops its server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.list:
        for name, (module, _) in BENCHMARKS.items():
            print(f"{name:13} {load(module).TITLE}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    selected = [args.profile] if args.profile else (args.names or list(BENCHMARKS))
    out = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(quick=args.quick, results_dir=out, log_dir=out / "logs", profile=args.profile)
    machine = machine_info()
    print(
        f"earshot benchmarks{' (quick)' if args.quick else ''}: {', '.join(selected)}\n"
        f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, load average "
        f"{', '.join(f'{x:.2f}' for x in machine['load_average'] or [])}; results in {out}",
        flush=True,
    )
    if args.profile:
        print(f"profiling {args.profile}: timings include the profiler's overhead and are not saved")
    started = time.perf_counter()
    results: list[BenchResult] = []
    for name in selected:
        module_name, _ = BENCHMARKS[name]
        module = load(module_name)
        print(f"\n-- {name}: {module.TITLE}", flush=True)
        t0 = time.perf_counter()
        try:
            result = module.run(ctx)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            traceback.print_exc()
            result = BenchResult(name, module.TITLE, module.METHOD, error=f"{type(exc).__name__}: {exc}")
        result.wall_s = time.perf_counter() - t0
        base = ctx.profile_base(name)
        if ctx.profiling(name) and not result.profile_files:
            result.profile_files = [
                str(p) for p in (base.with_suffix(".html"), base.with_suffix(".txt")) if p.exists()
            ]
        results.append(result)
        print_result(result)
    total = time.perf_counter() - started
    print_summary(results)
    print(f"\ntotal wall time: {total:.0f} s")
    if not args.profile:
        meta = {
            "quick": args.quick,
            "selected": selected,
            "total_wall_s": total,
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
        plot = out / "latency_vs_concurrency.png"
        throughput = next((r for r in results if r.name == "throughput" and not r.error), None)
        if throughput is not None and plot_throughput(plot, throughput):
            meta["plot"] = plot.name
        write_json(out / "results.json", machine, results, meta)
        write_markdown(out / "results.md", machine, results, meta)
        print(
            f"written: {out / 'results.json'}, {out / 'results.md'}" + (f", {plot}" if "plot" in meta else "")
        )
    over = [r for res in results for r in res.rows if r.ok is False]
    if over:
        print(f"{len(over)} figure(s) over target: " + "; ".join(f"{r.bench}: {r.metric}" for r in over))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
