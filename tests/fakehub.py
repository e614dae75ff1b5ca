"""A fake Hugging Face hub for tests: a small HTTP server in a thread serves local checkpoint
folders under the hub's URL layout (``/api/models/...``, ``/{repo}/resolve/{rev}/{file}``) with
byte ranges, the hub's error headers and commit headers. The real huggingface_hub client talks
to it through HF_ENDPOINT, in subprocesses: huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when it is imported, and the test session itself runs with HF_HUB_OFFLINE=1.
The `hub` fixture starts one; `qcli(...)` and `python(...)` run against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

MAIN = "main"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Served:
    """One request as the server saw it: what the client fetched, and how much of it."""

    method: str
    path: str
    status: int
    sent: int  # body bytes


@dataclass
class FakeHub:
    """Repos served like the hub: repo id -> {commit: folder}, plus refs (branches, tags)."""

    commits: dict[str, dict[str, Path]] = field(default_factory=dict)
    refs: dict[str, dict[str, str]] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    url: str = ""

    def add(self, repo_id: str, folder: Path, ref: str = MAIN) -> str:
        """Publish `folder` as a new commit of `repo_id` and point `ref` at it."""
        digest = hashlib.sha1(f"{repo_id}:{ref}:{folder}".encode()).hexdigest()
        self.commits.setdefault(repo_id, {})[digest] = folder
        self.refs.setdefault(repo_id, {})[ref] = digest
        return digest

    def resolve(self, repo_id: str, rev: str) -> str | None:
        if rev in self.commits.get(repo_id, {}):
            return rev
        return self.refs.get(repo_id, {}).get(rev)

    def weight_bytes_sent(self) -> int:
        return sum(s.sent for s in self.log if s.path.endswith(".safetensors"))


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, *args: object) -> None:  # quiet: the test reads hub.log
            pass

        def do_HEAD(self) -> None:  # noqa: N802  (http.server's naming)
            self._route(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._route(body=True)

        def _route(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            api = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)$", path)
            resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if api:
                repo_id, what, rev = api.groups()
                commit = self._commit(repo_id, rev, body)
                if commit is None:
                    return
                folder = hub.commits[repo_id][commit]
                files = sorted(p.name for p in folder.iterdir() if p.is_file())
                if what == "revision":
                    info = {
                        "id": repo_id,
                        "sha": commit,
                        "private": False,
                        "siblings": [{"rfilename": f} for f in files],
                    }
                else:
                    info = [
                        {
                            "type": "file",
                            "path": f,
                            "size": (folder / f).stat().st_size,
                            "oid": _etag(folder / f),
                        }
                        for f in files
                    ]
                self._send(
                    200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body
                )
            elif resolve:
                repo_id, rev, name = resolve.groups()
                commit = self._commit(repo_id, rev, body)
                if commit is None:
                    return
                file = hub.commits[repo_id][commit] / name
                if not file.is_file():
                    return self._error(404, "EntryNotFound", body)
                self._send_file(file, commit, body)
            else:
                self._error(404, "RepoNotFound", body)

        def _commit(self, repo_id: str, rev: str, body: bool) -> str | None:
            if repo_id not in hub.commits:
                self._error(404, "RepoNotFound", body)
                return None
            commit = hub.resolve(repo_id, rev)
            if commit is None:
                self._error(404, "RevisionNotFound", body)
            return commit

        def _send_file(self, file: Path, commit: str, body: bool) -> None:
            data = file.read_bytes()
            size = len(data)
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{_etag(file)}"',
                "Accept-Ranges": "bytes",
            }
            m = _RANGE.match(self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                if start >= size:
                    return self._send(416, b"", {"Content-Range": f"bytes */{size}"}, body)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return self._send(206, data[start : end + 1], headers, body)
            self._send(200, data, headers, body)

        def _error(self, status: int, code: str, body: bool) -> None:
            msg = json.dumps({"error": code}).encode()
            self._send(status, msg, {"X-Error-Code": code, "X-Error-Message": code}, body)

        def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            hub.log.append(Served(self.command, self.path, status, len(data) if body else 0))

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client closing its pooled connection is normal, not worth a traceback; a handler
        # bug shows up in the test's assertions on the request log.
        pass


def _etag(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """The fake hub on 127.0.0.1 (an ephemeral port), stopped when the test ends."""
    state = FakeHub()
    server = _Server(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _env(hub: FakeHub, home: Path, offline: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HOME=str(home),
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        QCLI_CACHE_DIR=str(home / "qcli"),
        NO_COLOR="1",
        COLUMNS="200",
    )
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_CACHE", None)
    return env


def qcli(
    hub: FakeHub, home: Path, *args: str, offline: bool = False
) -> subprocess.CompletedProcess:
    """`qcli ARGS` in a subprocess whose huggingface_hub talks to the fake hub."""
    code = "import sys; from qcli.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=_env(hub, home, offline),
        capture_output=True,
        text=True,
        timeout=300,
    )


def python(hub: FakeHub, home: Path, code: str, offline: bool = False) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(hub, home, offline),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
