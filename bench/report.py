"""Tables on the console, results.json, results.md and the latency-vs-concurrency plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Row, json_safe

HEADERS = ("benchmark", "metric", "earshot", "baseline", "ratio", "target", "result", "note")


def _num(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "loads":
        return f"{value:g}"
    if unit == "s":
        return f"{value:.2f} s"
    if unit in ("ms", "µs"):
        return (
            f"{value:.2f} {unit}"
            if value < 10
            else f"{value:.1f} {unit}"
            if value < 100
            else f"{value:.0f} {unit}"
        )
    return f"{value:.3g} {unit}"


def verdict(row: Row) -> str:
    ok = row.ok
    if ok is None:
        return ""
    if ok:
        return "ok"
    return "FAIL" if row.ok_override is not None else "OVER TARGET"


def row_cells(row: Row) -> list[str]:
    return [
        row.bench,
        row.metric,
        _num(row.value, row.unit),
        _num(row.baseline, row.unit) if row.baseline is not None else "",
        f"{row.ratio:.3f}" if row.ratio is not None and not math.isnan(row.ratio) else "",
        row.target_text,
        verdict(row),
        row.note,
    ]


def text_table(headers: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def md_table(headers: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    def esc(cell: Any) -> str:
        return str(cell).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def print_result(result: BenchResult) -> None:
    print()
    print(f"== {result.title}  ({result.wall_s:.0f} s)")
    if result.error:
        print(f"   ERROR: {result.error}")
        return
    print(text_table(HEADERS[1:], [row_cells(r)[1:] for r in result.rows]))
    if result.detail_table:
        print()
        keys = list(result.detail_table[0])
        print(text_table(keys, [[str(d[k]) for k in keys] for d in result.detail_table]))
    for path in result.profile_files:
        print(f"   profile: {path}")


def print_summary(results: list[BenchResult]) -> None:
    rows = [row_cells(r) for res in results for r in res.rows]
    print()
    print("== Summary")
    print(text_table(HEADERS[:-1], [r[:-1] for r in rows]))
    errors = [r for r in results if r.error]
    for r in errors:
        print(f"ERROR in {r.name}: {r.error}")


def write_json(path: Path, machine: dict[str, Any], results: list[BenchResult], meta: dict[str, Any]) -> None:
    data = {
        **meta,
        "machine": machine,
        "benchmarks": {
            r.name: {
                "title": r.title,
                "method": r.method,
                "wall_s": r.wall_s,
                "error": r.error,
                "rows": [{**asdict(row), "ratio": row.ratio, "ok": row.ok} for row in r.rows],
                "detail_table": r.detail_table,
                "details": r.details,
            }
            for r in results
        },
    }
    path.write_text(json.dumps(json_safe(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_markdown(
    path: Path, machine: dict[str, Any], results: list[BenchResult], meta: dict[str, Any]
) -> None:
    gib = (machine.get("ram_bytes") or 0) / 2**30
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    load = machine.get("load_average")
    lines = [
        "# earshot benchmarks",
        "",
        f"- date: {machine['date']}{'  (--quick: reduced repetitions, a smoke test)' if meta.get('quick') else ''}",
        f"- machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
        f"{gib:.1f} GiB RAM"
        + (f", GPUs: {'; '.join(machine['gpus'])}" if machine.get("gpus") else ", no GPU"),
        f"- load average at start: {', '.join(f'{x:.2f}' for x in load) if load else 'n/a'}; "
        f"at end: {', '.join(f'{x:.2f}' for x in meta.get('load_average_end') or []) or 'n/a'}",
        f"- Python {machine['python']} on {machine['platform']}; git {machine.get('git_commit') or '?'}",
        f"- {versions}",
        f"- total wall time: {meta.get('total_wall_s', 0):.0f} s",
        "",
        "Ratios are earshot / baseline (lower is better). A ratio or figure over its target is marked "
        "OVER TARGET.",
        "",
        md_table(HEADERS, [row_cells(r) for res in results for r in res.rows]),
        "",
    ]
    for r in results:
        lines += [f"## {r.title}", "", f"Benchmark `{r.name}`, {r.wall_s:.0f} s.", ""]
        if r.error:
            lines += [f"**Error:** `{r.error}`", ""]
        if r.detail_table:
            keys = list(r.detail_table[0])
            lines += [md_table(keys, [[str(d[k]) for k in keys] for d in r.detail_table]), ""]
        if r.name == "throughput" and meta.get("plot"):
            lines += [f"![latency vs concurrency]({meta['plot']})", ""]
        lines += ["What is timed:", "", *[f"    {line}" for line in r.method.splitlines()], ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot_throughput(path: Path, result: BenchResult) -> bool:
    """Latency (p50, p95) and requests/s against concurrency; False when there is nothing to plot."""
    levels = result.details.get("levels") if result.details else None
    if not levels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [lv["concurrency"] for lv in levels]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(x, [lv["latency_p50_ms"] for lv in levels], "o-", label="latency p50")
    ax.plot(x, [lv["latency_p95_ms"] for lv in levels], "s--", label="latency p95")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("request latency (ms)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, [lv["requests_per_s"] for lv in levels], "^:", color="tab:green", label="requests/s")
    ax2.set_ylabel("requests/s")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(handles, labels, loc="upper left")
    ax.set_title("earshot: tiny.en transcription of jfk.flac vs concurrency")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
