"""The compose stack without Docker: earshot, Prometheus and Alertmanager as local processes on loopback.

`make stack` (scripts/stack.py) and the end-to-end tests (tests/e2e/) both run this. The
Prometheus and Alertmanager configurations are *derived from the repository's files*, never
written a second time by hand:

- `derive_prometheus_config(prometheus.yml)`: the compose addresses of the scrape targets and of
  Alertmanager (`earshot:8000`, `alertmanager:9093`, `localhost:9090`) become 127.0.0.1 ports,
  `rule_files` become absolute paths of the repository's `alerts/*.rules.yml` (the real rules),
  and optionally the scrape/evaluation intervals are shortened (tests scrape every second).
- `derive_alertmanager_config(alertmanager.yml)`: the webhook URL becomes a local receiver, and
  optionally the routes' timing (group_wait, group_interval, ...) and `resolve_timeout` are
  shortened; routes, grouping, inhibition and `send_resolved` stay as in the file.

`Stack` writes both into a run directory (with the data directories and one log per process),
starts the processes each in its own process group, waits until each answers, and on exit stops
every one of them (SIGTERM to the group, then SIGKILL), on every path. `AlertReceiver` is a small
webhook receiver (an HTTP server thread) that collects Alertmanager's notifications.

Nothing here imports pytest: scripts/stack.py imports it too.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from tests.support.server import free_port, server_env

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

# The addresses prometheus.yml uses on the compose network, and the stack service behind each.
COMPOSE_ADDRESSES: Mapping[str, str] = {
    "earshot:8000": "earshot",
    "alertmanager:9093": "alertmanager",
    "localhost:9090": "prometheus",
    "prometheus:9090": "prometheus",
}
ROUTE_TIMING_KEYS = ("group_wait", "group_interval", "repeat_interval")

T = TypeVar("T")


class StackError(RuntimeError):
    """A process of the stack did not start, or its configuration cannot be derived."""


# --- Waiting ---------------------------------------------------------------------------------------


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str | Callable[[], str],
    *,
    interval: float = 0.25,
) -> T:
    """Call `check` until it returns something truthy (returned) or `timeout` seconds pass
    (TimeoutError with `what`, or `what()` for details gathered at that moment)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"after {timeout:.0f} s: {what() if callable(what) else what}")
        time.sleep(interval)


# --- Durations (Prometheus syntax: 1m30s, 500ms, 2h) ------------------------------------------------

_DURATION_UNITS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_DURATION = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus/Alertmanager duration string."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in parts)


# --- Derived configurations -------------------------------------------------------------------------


def _rewrite_targets(targets: list[str], addresses: Mapping[str, str], where: str) -> list[str]:
    out = []
    for target in targets:
        if target not in addresses:
            raise StackError(
                f"{where}: target {target!r} is not one of the compose addresses the stack knows "
                f"({sorted(addresses)}); add it to COMPOSE_ADDRESSES in tests/support/stack.py"
            )
        out.append(addresses[target])
    return out


def derive_prometheus_config(
    source: Mapping[str, Any],
    *,
    source_dir: Path,
    addresses: Mapping[str, str],
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
) -> dict[str, Any]:
    """`source` (prometheus.yml, loaded) for the local stack.

    `addresses` maps each compose target (`earshot:8000`, ...) to its local `127.0.0.1:PORT`; an
    unknown target is an error rather than a silently dead scrape. `rule_files` patterns, relative
    to `source_dir` in the file, become absolute (each must match a file). A shortened
    `scrape_interval` also applies to jobs that set their own, and `scrape_timeout` is capped at
    the scrape interval (Prometheus refuses a timeout longer than the interval).
    """
    config: dict[str, Any] = copy.deepcopy(dict(source))
    settings = config.setdefault("global", {})
    if scrape_interval is not None:
        settings["scrape_interval"] = scrape_interval
    if evaluation_interval is not None:
        settings["evaluation_interval"] = evaluation_interval
    global_interval = settings.get("scrape_interval", "1m")
    global_timeout = settings.get("scrape_timeout", "10s")
    if parse_duration(global_timeout) > parse_duration(global_interval):
        settings["scrape_timeout"] = global_interval

    rule_files = []
    for pattern in config.get("rule_files") or []:
        absolute = pattern if os.path.isabs(pattern) else str(source_dir / pattern)
        if not glob.glob(absolute):
            raise StackError(f"rule_files {pattern!r}: matches nothing ({absolute})")
        rule_files.append(absolute)
    config["rule_files"] = rule_files

    for job in config.get("scrape_configs") or []:
        name = job.get("job_name", "?")
        if scrape_interval is not None and "scrape_interval" in job:
            job["scrape_interval"] = scrape_interval
        interval = job.get("scrape_interval", settings["scrape_interval"])
        timeout = job.get("scrape_timeout", settings.get("scrape_timeout", "10s"))
        if parse_duration(timeout) > parse_duration(interval):
            job["scrape_timeout"] = interval
        for static in job.get("static_configs") or []:
            static["targets"] = _rewrite_targets(static.get("targets", []), addresses, f"scrape job {name}")
    for manager in (config.get("alerting") or {}).get("alertmanagers") or []:
        for static in manager.get("static_configs") or []:
            static["targets"] = _rewrite_targets(static.get("targets", []), addresses, "alerting")
    return config


def _routes(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield route
    for child in route.get("routes") or []:
        yield from _routes(child)


def derive_alertmanager_config(
    source: Mapping[str, Any],
    *,
    webhook_url: str,
    timing: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`source` (alertmanager.yml, loaded) for the local stack.

    Every webhook receiver posts to `webhook_url`. `timing` may shorten `resolve_timeout` and the
    routes' `group_wait`, `group_interval`, `repeat_interval`: the root route always, a sub-route
    where it sets its own value (so its relation to the root stays as in the file).
    """
    config: dict[str, Any] = copy.deepcopy(dict(source))
    hooks = 0
    for receiver in config.get("receivers") or []:
        for hook in receiver.get("webhook_configs") or []:
            hook["url"] = webhook_url
            hooks += 1
    if not hooks:
        raise StackError("alertmanager.yml has no webhook_configs to point at the local receiver")
    timing = dict(timing or {})
    unknown = set(timing) - {"resolve_timeout", *ROUTE_TIMING_KEYS}
    if unknown:
        raise ValueError(f"unknown Alertmanager timing fields: {sorted(unknown)}")
    for value in timing.values():
        parse_duration(value)
    if "resolve_timeout" in timing:
        config.setdefault("global", {})["resolve_timeout"] = timing["resolve_timeout"]
    root = config["route"]
    for route in _routes(root):
        for key in ROUTE_TIMING_KEYS:
            if key in timing and (route is root or key in route):
                route[key] = timing[key]
    return config


# --- Alert receiver ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    """One webhook notification from Alertmanager (a group of alerts)."""

    received_at: float  # time.monotonic()
    payload: dict[str, Any]

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return list(self.payload.get("alerts", []))


class AlertReceiver:
    """A webhook receiver on 127.0.0.1 (an HTTP server thread) that collects Alertmanager's JSON.

    `on_notification` is called (in the server thread) for every notification, e.g. to print it.
    """

    def __init__(self, port: int = 0, on_notification: Callable[[Notification], None] | None = None) -> None:
        self._notifications: list[Notification] = []
        self._changed = threading.Condition()
        self._on_notification = on_notification
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body)
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                self.send_response(200)
                self.end_headers()
                receiver._add(Notification(time.monotonic(), payload))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="alert-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/"

    def start(self) -> AlertReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()

    def __enter__(self) -> AlertReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _add(self, notification: Notification) -> None:
        with self._changed:
            self._notifications.append(notification)
            self._changed.notify_all()
        if self._on_notification is not None:
            self._on_notification(notification)

    def notifications(self) -> list[Notification]:
        with self._changed:
            return list(self._notifications)

    def wait_for_alert(
        self, match: Callable[[dict[str, Any]], bool], timeout: float, *, since: int = 0
    ) -> tuple[Notification, dict[str, Any]] | None:
        """The first alert (in notifications[since:]) that `match`es, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for notification in self._notifications[since:]:
                    for alert in notification.alerts:
                        if match(alert):
                            return notification, alert
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)


def print_notification(notification: Notification) -> None:
    """One line per alert of a notification, for `make stack`."""
    stamp = time.strftime("%H:%M:%S")
    for alert in notification.alerts:
        labels = alert.get("labels", {})
        summary = alert.get("annotations", {}).get("summary", "")
        print(
            f"[{stamp}] alert {alert.get('status', '?'):8} {labels.get('alertname', '?')} "
            f"({labels.get('severity', '-')}) {summary}",
            flush=True,
        )


# --- Processes -----------------------------------------------------------------------------------------


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ManagedProcess:
    """A process started in its own process group (a session), logging to one file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    stop_timeout: float = 30
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def group_exists(self) -> bool:
        """Whether any process of its group (itself or a child) is still there."""
        if self.popen is None:
            return False
        self.popen.poll()  # reap it if it has exited
        return _group_exists(self.popen.pid)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the group, wait for the process, then SIGKILL whatever of the group is left."""
        if self.popen is None:
            return
        pgid = self.popen.pid
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(self.stop_timeout)
        if _group_exists(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        # Children of the group are not ours to reap; give the kernel a moment to drop them.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not _group_exists(pgid), 5, "group gone", interval=0.05)


def find_executable(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise StackError(
        f"none of {', '.join(names)} found on PATH: run scripts/install-system-deps.sh (make system-deps)"
    )


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


# --- The stack -------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """earshot + Prometheus + Alertmanager (+ a webhook receiver) on loopback; a context manager.

    Ports 0 pick free ones. `receiver_url=None` runs the built-in `AlertReceiver` (on
    `receiver_port`, `self.receiver`). `scrape_interval`/`evaluation_interval` None keep
    prometheus.yml's; `alertmanager_timing` shortens alertmanager.yml's (see
    derive_alertmanager_config). `earshot_settings` are earshot settings by field name (or full
    env names); with `inherit_env` earshot also sees this process's EARSHOT_*/SPEACHES_* variables,
    without it only these (plus offline defaults, as the integration tests run it).
    """

    run_dir: Path
    earshot_port: int = 0
    prometheus_port: int = 0
    alertmanager_port: int = 0
    receiver_port: int = 0
    receiver_url: str | None = None
    scrape_interval: str | None = None
    evaluation_interval: str | None = None
    alertmanager_timing: Mapping[str, str] = field(default_factory=dict)
    earshot_settings: Mapping[str, Any] = field(default_factory=dict)
    models_dir: Path = REPO / "models"
    inherit_env: bool = False
    earshot_cwd: Path | None = None
    ready_timeout: float = 120
    on_notification: Callable[[Notification], None] | None = None
    prometheus_yml: Path = REPO / "prometheus.yml"
    alertmanager_yml: Path = REPO / "alertmanager.yml"

    receiver: AlertReceiver | None = field(default=None, init=False)
    processes: dict[str, ManagedProcess] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        self.earshot_port = self.earshot_port or free_port()
        self.prometheus_port = self.prometheus_port or free_port()
        self.alertmanager_port = self.alertmanager_port or free_port()

    # Addresses ------------------------------------------------------------------------------------

    @property
    def earshot_instance(self) -> str:
        """The `instance` label Prometheus gives earshot's series."""
        return f"{LOOPBACK}:{self.earshot_port}"

    @property
    def earshot_url(self) -> str:
        return f"http://{self.earshot_instance}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{LOOPBACK}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{LOOPBACK}:{self.alertmanager_port}"

    @property
    def webhook_url(self) -> str:
        if self.receiver_url is not None:
            return self.receiver_url
        assert self.receiver is not None, "the stack is not started"
        return self.receiver.url

    def addresses(self) -> dict[str, str]:
        ports = {
            "earshot": self.earshot_port,
            "prometheus": self.prometheus_port,
            "alertmanager": self.alertmanager_port,
        }
        return {address: f"{LOOPBACK}:{ports[service]}" for address, service in COMPOSE_ADDRESSES.items()}

    # Configurations ----------------------------------------------------------------------------------

    def prometheus_config(self) -> dict[str, Any]:
        return derive_prometheus_config(
            yaml.safe_load(self.prometheus_yml.read_text()),
            source_dir=self.prometheus_yml.resolve().parent,
            addresses=self.addresses(),
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.evaluation_interval,
        )

    def alertmanager_config(self) -> dict[str, Any]:
        return derive_alertmanager_config(
            yaml.safe_load(self.alertmanager_yml.read_text()),
            webhook_url=self.webhook_url,
            timing=self.alertmanager_timing,
        )

    @property
    def prometheus_config_path(self) -> Path:
        return self.run_dir / "prometheus.yml"

    @property
    def alertmanager_config_path(self) -> Path:
        return self.run_dir / "alertmanager.yml"

    def write_configs(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        header = "# Generated by tests/support/stack.py from {} - edit that file, not this one.\n"
        self.prometheus_config_path.write_text(
            header.format(self.prometheus_yml) + yaml.safe_dump(self.prometheus_config(), sort_keys=False)
        )
        self.alertmanager_config_path.write_text(
            header.format(self.alertmanager_yml) + yaml.safe_dump(self.alertmanager_config(), sort_keys=False)
        )

    # Processes ---------------------------------------------------------------------------------------

    def _earshot_env(self) -> dict[str, str]:
        if self.inherit_env:
            env = dict(os.environ)
            env.setdefault("EARSHOT_MODELS_DIR", str(self.models_dir))
            env.setdefault("PYTHONUNBUFFERED", "1")
            for key, value in self.earshot_settings.items():
                name = key if key.isupper() else f"EARSHOT_{key.upper()}"
                env[name] = value if isinstance(value, str) else json.dumps(value)
        else:
            env = server_env(self.models_dir, self.earshot_settings)
        env["EARSHOT_HOST"] = LOOPBACK
        env["EARSHOT_PORT"] = str(self.earshot_port)
        return env

    def _define_processes(self) -> list[tuple[ManagedProcess, str]]:
        logs = self.run_dir / "logs"
        earshot = ManagedProcess(
            "earshot",
            [sys.executable, "-m", "earshot.cli", "serve"],
            logs / "earshot.log",
            env=self._earshot_env(),
            cwd=self.earshot_cwd or self.run_dir,
            stop_timeout=40,  # the cache's shutdown grace is 30 s
        )
        alertmanager = ManagedProcess(
            "alertmanager",
            [
                find_executable("prometheus-alertmanager", "alertmanager"),
                f"--config.file={self.alertmanager_config_path}",
                f"--storage.path={self.run_dir / 'alertmanager-data'}",
                f"--web.listen-address={LOOPBACK}:{self.alertmanager_port}",
                "--cluster.listen-address=",
            ],
            logs / "alertmanager.log",
        )
        prometheus = ManagedProcess(
            "prometheus",
            [
                find_executable("prometheus"),
                f"--config.file={self.prometheus_config_path}",
                f"--storage.tsdb.path={self.run_dir / 'prometheus-data'}",
                f"--web.listen-address={LOOPBACK}:{self.prometheus_port}",
                "--web.enable-lifecycle",
            ],
            logs / "prometheus.log",
        )
        return [
            (earshot, f"{self.earshot_url}/health"),
            (alertmanager, f"{self.alertmanager_url}/-/ready"),
            (prometheus, f"{self.prometheus_url}/-/ready"),
        ]

    def _wait_answers(self, process: ManagedProcess, url: str, deadline: float) -> None:
        while True:
            if not process.running():
                code = process.popen.returncode if process.popen else None
                raise StackError(f"{process.name} exited with {code}:\n{process.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise StackError(f"{process.name} did not answer {url}:\n{process.log_tail()}")
            time.sleep(0.2)

    def start(self) -> Stack:
        """Write the configs, start everything, wait until each answers (on failure: stop all)."""
        try:
            busy = [
                f"{name} {port}"
                for name, port in (
                    ("earshot", self.earshot_port),
                    ("prometheus", self.prometheus_port),
                    ("alertmanager", self.alertmanager_port),
                    ("alert receiver", self.receiver_port if self.receiver_url is None else 0),
                )
                if port and not port_is_free(port)
            ]
            if busy:
                raise StackError(f"ports in use on {LOOPBACK}: {', '.join(busy)}")
            if self.receiver_url is None:
                self.receiver = AlertReceiver(self.receiver_port, self.on_notification).start()
            self.write_configs()
            planned = self._define_processes()
            # All start at once (earshot takes the longest); Prometheus retries scrapes that fail.
            for process, _ in planned:
                self.processes[process.name] = process
                process.start()
            deadline = time.monotonic() + self.ready_timeout
            for process, url in planned:
                self._wait_answers(process, url, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process this stack started (Prometheus first), and the receiver."""
        errors: list[BaseException] = []
        for name in ("prometheus", "alertmanager", "earshot"):
            process = self.processes.get(name)
            if process is None:
                continue
            try:
                process.stop()
            except BaseException as e:  # keep stopping the others
                errors.append(e)
        if self.receiver is not None:
            self.receiver.stop()
        if errors:
            raise errors[0]

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items() if p.popen is not None}

    def leftovers(self) -> list[str]:
        """Names of the processes whose process group still has a member (after stop(): none)."""
        return [name for name, p in self.processes.items() if p.group_exists()]

    def check_running(self) -> None:
        dead = [name for name, p in self.processes.items() if not p.running()]
        if dead:
            tails = "\n".join(f"--- {n}:\n{self.processes[n].log_tail(2000)}" for n in dead)
            raise StackError(f"stopped unexpectedly: {', '.join(dead)}\n{tails}")

    # Prometheus API ------------------------------------------------------------------------------------

    def _api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.prometheus_url}{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise StackError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (Prometheus /api/v1/query)."""
        data = self._api("/api/v1/query", query=expr)
        result = data["result"]
        if data["resultType"] != "vector":
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_value(self, expr: str) -> float | None:
        """The single value of an instant query (None when the result is empty)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) != 1:
            raise StackError(f"{expr}: expected one series, got {result}")
        return float(result[0]["value"][1])

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self._api(f"/api/v1/label/{label}/values", **{"match[]": match}))

    def alerts(self) -> list[dict[str, Any]]:
        """Prometheus's active (pending or firing) alerts."""
        return list(self._api("/api/v1/alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self._api("/api/v1/targets")["activeTargets"])

    def wait_scraped(self, timeout: float = 60) -> None:
        """Until every scrape target is up and Prometheus knows its Alertmanager."""

        def ready() -> bool:
            targets = self.targets()
            managers = self._api("/api/v1/alertmanagers")["activeAlertmanagers"]
            return bool(targets) and all(t["health"] == "up" for t in targets) and bool(managers)

        wait_until(ready, timeout, lambda: f"targets not all up: {self.targets()}", interval=0.5)
