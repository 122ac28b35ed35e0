"""`earshot ps`: the loaded models of a running server (GET /api/ps), and with `--watch` its cache
events as they happen (GET /api/events?stream=true, Server-Sent Events), one line each.

    MODEL                    TASK            SIZE        IDLE     EXPIRES IN   IN USE   PINNED
    faster-whisper-tiny.en   transcription   75.5 MiB    12s      4m 48s       0        no
    kokoro-82m-v1.0-int8     speech          ~88.1 MiB   -        -            1        yes

SIZE is the measured footprint (`~`: the estimate, not measured yet). EXPIRES IN counts from the
server's own numbers (keep_alive - idle_seconds), so clock skew between client and server does
not matter. Exit status: 0 on success (and on Ctrl-C while watching), 1 when the server cannot be
reached, refuses the API key, answers with an error, or closes the event stream.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import httpx

COLUMNS = ("MODEL", "TASK", "SIZE", "IDLE", "EXPIRES IN", "IN USE", "PINNED")
REQUEST_TIMEOUT = 10.0
# The server sends a keepalive comment every 15 s; this much silence means the connection is dead.
STREAM_READ_TIMEOUT = 60.0
_EVENT_KEYS = ("id", "event", "model", "task", "at")


# ---------------------------------------------------------------------- formatting


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    minutes, s = divmod(s, 60)
    if minutes < 60:
        return f"{minutes}m {s}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _expires_in(model: Mapping[str, Any], now: datetime) -> str:
    if model.get("loading") and not model.get("loaded", True):
        return "-"
    keep_alive = model.get("keep_alive")
    if model.get("pinned") or (isinstance(keep_alive, int | float) and keep_alive < 0):
        return "never"
    idle = model.get("idle_seconds")
    if model.get("expires_at") is None:
        return "-"  # in use (the timer starts at release), or nothing scheduled
    if isinstance(keep_alive, int | float) and isinstance(idle, int | float):
        return human_seconds(keep_alive - idle)  # the server's clock only
    expires = _parse_time(model.get("expires_at"))
    return "-" if expires is None else human_seconds((expires - now).total_seconds())


def _row(model: Mapping[str, Any], now: datetime) -> tuple[str, ...]:
    loading = bool(model.get("loading")) and not model.get("loaded", True)
    size = human_bytes(model.get("size_bytes"))
    if size != "-" and model.get("size_measured") is False:
        size = "~" + size
    idle = "loading" if loading else human_seconds(model.get("idle_seconds"))
    return (
        str(model.get("model", "?")),
        str(model.get("task", "-")),
        size,
        idle,
        _expires_in(model, now),
        str(model.get("in_use", 0)),
        "yes" if model.get("pinned") else "no",
    )


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def ps_table(payload: Mapping[str, Any], now: datetime | None = None) -> str:
    """The table of a GET /api/ps answer (a fleet's, whose models name their worker: a WORKER
    column too)."""
    now = now or datetime.now(UTC)
    models = payload.get("models", [])
    if any("worker" in m for m in models):
        rows = [(*_row(m, now), str(m.get("worker", "-"))) for m in models]
        return format_table(rows, (*COLUMNS, "WORKER"))
    return format_table([_row(m, now) for m in models])


def _detail(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key}={'yes' if value else 'no'}"
    if key.endswith("_bytes") and isinstance(value, int | float):
        return f"{key.removesuffix('_bytes')}={human_bytes(value)}"
    if key.endswith("_s") and isinstance(value, int | float):
        return f"{key}={value:.3f}"
    if isinstance(value, Mapping):
        inner = ",".join(f"{k}:{human_bytes(v) if isinstance(v, int) else v}" for k, v in value.items())
        return f"{key}={inner or '-'}"
    if isinstance(value, str) and (" " in value or not value):
        return f"{key}={json.dumps(value)}"
    return f"{key}={value}"


def event_line(record: Mapping[str, Any]) -> str:
    """One line for one cache event record (or the server's `events_dropped` notice)."""
    if record.get("event") == "events_dropped":
        return f"-- {record.get('dropped', '?')} events dropped: this client read too slowly --"
    at = _parse_time(record.get("at"))
    when = at.astimezone().strftime("%H:%M:%S.%f")[:-3] if at else "--:--:--.---"
    details = " ".join(_detail(k, v) for k, v in record.items() if k not in _EVENT_KEYS)
    if record.get("model") is None and "worker" in record:  # a fleet worker's own event
        subject = f"worker {record['worker']}"
        details = " ".join(_detail(k, v) for k, v in record.items() if k not in (*_EVENT_KEYS, "worker"))
    else:
        subject = f"{record.get('model', '?')} ({record.get('task', '?')})"
    line = f"{when}  {record.get('event', '?'):<18}  {subject}"
    return f"{line}  {details}" if details else line


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data` of each Server-Sent Event in a stream of lines (comments and other fields skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


# ---------------------------------------------------------------------- the command


class _Failure(Exception):
    pass


def _check(response: httpx.Response, base_url: str) -> None:
    if response.status_code in (401, 403):
        raise _Failure(
            f"the server at {base_url} refused the API key (HTTP {response.status_code}); "
            "pass --api-key or set EARSHOT_API_KEY"
        )
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise _Failure(f"GET {response.request.url.path} failed: HTTP {response.status_code}: {message}")


def _watch(client: httpx.Client, base_url: str, out: TextIO, hits: bool) -> int:
    timeout = httpx.Timeout(REQUEST_TIMEOUT, read=STREAM_READ_TIMEOUT)
    params = {"stream": "true", **({"hits": "true"} if hits else {})}
    with client.stream("GET", "/api/events", params=params, timeout=timeout) as response:
        _check(response, base_url)
        try:
            for data in sse_data(response.iter_lines()):
                try:
                    record = json.loads(data)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    out.write(event_line(record) + "\n")
                    out.flush()
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise _Failure(f"lost the connection to the server at {base_url} ({exc})") from None
        except httpx.ReadTimeout:
            raise _Failure(f"no data from the server at {base_url} for {STREAM_READ_TIMEOUT:g}s") from None
    raise _Failure("the server closed the event stream")


def run_ps(
    base_url: str,
    api_key: str | None,
    watch: bool,
    out: TextIO = sys.stdout,
    *,
    err: TextIO | None = None,
    transport: httpx.BaseTransport | None = None,
    hits: bool = False,
) -> int:
    """Print the loaded models; with `watch`, then follow the cache events until interrupted (with
    `hits`, each cache hit too: a line per request under traffic, so off by default)."""
    err = err if err is not None else sys.stderr
    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(
            base_url=base, headers=headers, timeout=REQUEST_TIMEOUT, transport=transport
        ) as client:
            response = client.get("/api/ps")
            _check(response, base)
            try:
                payload = response.json()
            except ValueError:
                raise _Failure(f"{base}/api/ps did not answer JSON: is this an earshot server?") from None
            out.write(ps_table(payload))
            out.flush()
            if watch:
                return _watch(client, base, out, hits)
    except KeyboardInterrupt:
        return 0
    except _Failure as exc:
        print(f"earshot ps: {exc}", file=err)
        return 1
    except httpx.TimeoutException:
        print(f"earshot ps: the server at {base} did not answer in time", file=err)
        return 1
    except httpx.HTTPError as exc:
        print(f"earshot ps: cannot reach the server at {base}: {exc}", file=err)
        return 1
    return 0
