"""Start the real earshot server (uvicorn on a free 127.0.0.1 port) for integration tests, and stop it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    api_key: str | None = None

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs)

    def log_lines(self) -> list[dict[str, Any]]:
        """The server's JSON log lines so far (non-JSON lines skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out

    def alive(self) -> bool:
        return self.process.poll() is None


def server_env(models_dir: Path, settings: Mapping[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EARSHOT_", "SPEACHES_"))}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "EARSHOT_MODELS_DIR": str(models_dir),
            "EARSHOT_BUILTIN_HUB_MODELS": "false",
            "EARSHOT_NVML_INTERVAL_SECONDS": "1",
        }
    )
    for key, value in settings.items():
        name = key if key.isupper() else f"EARSHOT_{key.upper()}"
        env[name] = value if isinstance(value, str) else json.dumps(value)
    return env


@contextlib.contextmanager
def run_server(
    models_dir: Path, log_dir: Path, *, ready_timeout: float = 120, **settings: Any
) -> Iterator[Server]:
    """Serve with the given settings (names of Settings fields, or full env names); stop on exit."""
    port = free_port()
    env = server_env(models_dir, settings)
    env["EARSHOT_PORT"] = str(port)
    env["EARSHOT_HOST"] = "127.0.0.1"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"earshot-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "earshot.cli", "serve"],
            env=env,
            cwd=log_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, api_key=settings.get("api_key"))
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"earshot exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"earshot did not answer /health:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is not None:  # it ended already: end what it left in its process group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def wait_ready(server: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(server.url + "/health/ready", timeout=5).status_code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError("server never became ready")
