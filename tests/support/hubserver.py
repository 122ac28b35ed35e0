"""A stand-in for the Hugging Face Hub on 127.0.0.1, answering the HTTP calls huggingface_hub really
makes (read from its source: hf_api.model_info / repo_info, list_repo_tree, file_download's HEAD and
GET of /resolve/), so the real lookup and download code runs against it with `HF_ENDPOINT` set.

    GET  /api/models/{repo}[/revision/{rev}]      model info: sha, siblings (with sizes)
    GET  /api/models/{repo}/tree/{rev}?recursive  the file list (one page)
    HEAD /{repo}/resolve/{rev}/{path}             X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}             the bytes (Range honoured)

An unknown repo is a 404 with `X-Error-Code: RepoNotFound`, as the Hub answers. Every request is
recorded (method, path) so tests can see what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class Repo:
    files: Mapping[str, Path | bytes]
    commit: str = ""

    def data(self, path: str) -> bytes:
        content = self.files[path]
        return content if isinstance(content, bytes) else content.read_bytes()

    def size(self, path: str) -> int:
        content = self.files[path]
        return len(content) if isinstance(content, bytes) else content.stat().st_size


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)

    def resolved(self, repo_id: str) -> list[str]:
        """Files of `repo_id` whose bytes were sent (GET of /resolve/)."""
        prefix = f"/{repo_id}/resolve/"
        return [p.split("/", 5)[-1] for m, p in self.requests if m == "GET" and p.startswith(prefix)]


def _etag(repo_id: str, path: str) -> str:
    return hashlib.sha256(f"{repo_id}/{path}".encode()).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return None

        def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data: object, headers: Mapping[str, str] | None = None) -> None:
            self._send(
                200, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}
            )

        def _not_found(self, code: str = "RepoNotFound") -> None:
            self._send(
                404, b'{"error":"not found"}', {"X-Error-Code": code, "Content-Type": "application/json"}
            )

        def _route(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if m := _TREE.match(path):
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    return self._not_found()
                entries = [
                    {"type": "file", "path": p, "size": repo.size(p), "oid": _etag(m.group(1), p)[:40]}
                    for p in sorted(repo.files)
                ]
                return self._json(entries)
            if m := _INFO.match(path):
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    return self._not_found()
                siblings = [{"rfilename": p, "size": repo.size(p)} for p in sorted(repo.files)]
                return self._json(
                    {"id": m.group(1), "sha": repo.commit, "siblings": siblings, "private": False}
                )
            if m := _RESOLVE.match(path):
                repo_id, _rev, file = m.groups()
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._not_found()
                if file not in repo.files:
                    return self._send(
                        404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}
                    )
                data = repo.data(file)
                headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_etag(repo_id, file)}"'}
                rng = self.headers.get("Range")
                if rng and (r := re.match(r"bytes=(\d+)-", rng)):
                    start = int(r.group(1))
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._send(206, data[start:], headers)
                return self._send(200, data, headers)
            return self._send(404, b"")

        def do_GET(self) -> None:
            self._route()

        def do_HEAD(self) -> None:
            self._route()

    return Handler


@contextmanager
def fake_hub(repos: Mapping[str, Mapping[str, Path | bytes]]) -> Iterator[FakeHub]:
    hub = FakeHub({rid: Repo(files, hashlib.sha1(rid.encode()).hexdigest()) for rid, files in repos.items()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
