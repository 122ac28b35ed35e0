"""What every benchmark shares: statistics, timing, the server under test, metrics reading, report rows.

A benchmark module exposes `run(ctx: Context) -> BenchResult`. The runner (`bench.__main__`) builds
the context (quick or full repetitions, where results and logs go, which benchmark to profile),
runs the selected benchmarks, and writes the report (`bench.report`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "models"
RESULTS_DIR = REPO / "bench" / "results"
JFK = REPO / "tests" / "data" / "jfk.flac"

STT_MODEL = "faster-whisper-tiny.en"
TTS_MODEL = "kokoro-82m-v1.0-int8"


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; nan if empty."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def summary(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """n, median, p95, p99, min, max of `values` multiplied by `scale` (e.g. 1000 for s -> ms)."""
    return {
        "n": len(values),
        "median": median(values) * scale,
        "p95": percentile(values, 95) * scale,
        "p99": percentile(values, 99) * scale,
        "min": (min(values) if values else math.nan) * scale,
        "max": (max(values) if values else math.nan) * scale,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the summary table: an earshot figure against its baseline or its target.

    `ratio` is value/baseline (None when the row has no baseline). `target` is the largest
    acceptable value of `ratio` (or, for rows without a baseline, of `value`); `ok` compares.
    """

    bench: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    target: float | None = None
    target_text: str = ""
    note: str = ""
    ok_override: bool | None = None  # a pass/fail that is not "<= target" (e.g. loads == 1)

    @property
    def ratio(self) -> float | None:
        return None if self.baseline is None else ratio(self.value, self.baseline)

    @property
    def ok(self) -> bool | None:
        if self.ok_override is not None:
            return self.ok_override
        if self.target is None:
            return None
        measured = self.ratio if self.ratio is not None else self.value
        return measured is not None and not math.isnan(measured) and measured <= self.target


def median_ratio_row(
    bench: str,
    metric: str,
    seconds: list[float],
    baseline_seconds: list[float],
    target: float,
    note: str,
) -> Row:
    """A row of medians in milliseconds, earshot's against its baseline's, with a ratio target."""
    return Row(
        bench,
        metric,
        median(seconds) * 1000,
        "ms",
        baseline=median(baseline_seconds) * 1000,
        target=target,
        target_text=f"ratio <= {target}",
        note=note,
    )


@dataclass
class BenchResult:
    name: str
    title: str
    method: str  # what is timed on each side, in words (goes into results.md)
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # everything measured, for results.json
    detail_table: list[dict[str, Any]] = field(default_factory=list)  # extra table (throughput levels)
    wall_s: float = 0.0
    error: str | None = None
    profile_files: list[str] = field(default_factory=list)


@dataclass
class Context:
    quick: bool
    results_dir: Path
    log_dir: Path
    profile: str | None = None  # name of the benchmark whose earshot side runs under the profiler

    def reps(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def profiling(self, name: str) -> bool:
        return self.profile == name

    def profile_base(self, name: str) -> Path:
        return self.results_dir / f"profile-{name}"


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- the server under test


@dataclass
class BenchServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self, timeout: float = 300) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it if the benchmark process dies, even by SIGKILL,
    so no server outlives an interrupted run."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


@contextlib.contextmanager
def earshot_server(
    ctx: Context,
    name: str,
    *,
    ready_timeout: float = 120,
    command: str = "serve",
    models_dir: Path = MODELS_DIR,
    stop_timeout: float = 30,
    **settings: Any,
) -> Iterator[BenchServer]:
    """The real server (`earshot serve`, one uvicorn process; or `command`, e.g. "fleet") on a free
    127.0.0.1 port, with the demo models of ./models (or `models_dir`) and default settings
    otherwise (overridden by `settings`). Stopped on every
    path (SIGTERM to its process group, SIGKILL after 30 s). Under `--profile NAME` for this
    benchmark it runs inside pyinstrument (bench._profiled_server), which writes the profile on exit.
    """
    from tests.support.server import free_port, server_env, stop

    settings.setdefault("nvml_interval_seconds", 5)  # the default (server_env sets 1 for tests)
    port = free_port()
    env = server_env(models_dir, settings)
    env["EARSHOT_PORT"] = str(port)
    env["EARSHOT_HOST"] = "127.0.0.1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = ctx.log_dir / f"earshot-{name}-{port}.log"
    if ctx.profiling(name):
        argv = [sys.executable, "-m", "bench._profiled_server", str(ctx.profile_base(name))]
    else:
        argv = [sys.executable, "-m", "earshot.cli", command]
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    server = BenchServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"earshot exited with {process.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + "/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"earshot did not become ready:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    except BaseException:
        print(f"--- server log ({log_path}), last lines:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        # A profiled server writes its profile while shutting down: give it time.
        stop(process, timeout=120 if ctx.profiling(name) else stop_timeout)


# --------------------------------------------------------------------------- talking to it


def transcribe(client: httpx.Client, audio: bytes, model: str = STT_MODEL) -> dict[str, Any]:
    """POST /v1/audio/transcriptions (response_format json); the parsed body. Raises on non-200."""
    r = client.post(
        "/v1/audio/transcriptions",
        files={"file": ("jfk.flac", audio, "audio/flac")},
        data={"model": model, "response_format": "json"},
    )
    if r.status_code != 200:
        raise RuntimeError(f"transcription failed: {r.status_code} {r.text[:500]}")
    return dict(r.json())


def speech(client: httpx.Client, text: str, voice: str, model: str = TTS_MODEL) -> bytes:
    """POST /v1/audio/speech (wav, speed 1); the body. Raises on non-200."""
    r = client.post(
        "/v1/audio/speech",
        json={"model": model, "input": text, "voice": voice, "response_format": "wav", "speed": 1.0},
    )
    if r.status_code != 200:
        raise RuntimeError(f"speech failed: {r.status_code} {r.text[:500]}")
    return r.content


def load_model(client: httpx.Client, model: str) -> None:
    r = client.post(f"/api/ps/{model}")
    if r.status_code != 200:
        raise RuntimeError(f"loading {model} failed: {r.status_code} {r.text[:500]}")


def unload_model(client: httpx.Client, model: str, timeout: float = 60) -> None:
    """DELETE /api/ps/{model}, then wait until /api/ps no longer lists it (unload finished)."""
    r = client.delete(f"/api/ps/{model}")
    if r.status_code not in (200, 202, 404):
        raise RuntimeError(f"unloading {model} failed: {r.status_code} {r.text[:500]}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = [m["model"] for m in client.get("/api/ps").json()["models"]]
        if model not in listed:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{model} still listed in /api/ps {timeout}s after DELETE")


def scrape(client: httpx.Client) -> str:
    r = client.get("/metrics")
    r.raise_for_status()
    return r.text


def metric(exposition: str, sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` (e.g. earshot_model_loads_total, ..._sum, ..._count) whose
    labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def metric_delta(before: str, after: str, sample: str, **labels: str) -> float:
    """How much `sample` (summed over the series matching `labels`) grew from one scrape to the next."""
    return metric(after, sample, **labels) - metric(before, sample, **labels)


def histogram_mean(before: str, after: str, histogram: str, **labels: str) -> float:
    """The mean of the observations `histogram` got between two scrapes (nan if none)."""
    count = metric_delta(before, after, f"{histogram}_count", **labels)
    return metric_delta(before, after, f"{histogram}_sum", **labels) / count if count else math.nan


def quiesce() -> None:
    """Between measured sections: collect garbage now rather than inside a timed call."""
    gc.collect()


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import datetime
    import importlib.metadata
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
                break
    versions = {}
    for dist in (
        "earshot",
        "faster-whisper",
        "ctranslate2",
        "kokoro-onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "litestar",
        "uvicorn",
        "httpx",
        "numpy",
        "av",
        "prometheus-client",
        "pyinstrument",
        "matplotlib",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "ram_bytes": ram,
        "gpus": gpus,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
    }


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has neither), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
