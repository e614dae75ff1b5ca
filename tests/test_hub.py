"""Hub repo ids: headers without weights (qcli.hub) and quantize from the cache (qcli.source).

A small HTTP server in a thread plays the hub: it serves local checkpoint folders under the
hub's URL layout (``/api/models/...``, ``/{repo}/resolve/{rev}/{file}``) with byte ranges, the
hub's error headers and commit headers. The real huggingface_hub client talks to it through
HF_ENDPOINT, in subprocesses: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE
when it is imported, and the test session itself runs with HF_HUB_OFFLINE=1.
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

from qcli.hub import FIRST_RANGE
from tests.builders import load_config

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


# --- qcli.hub: headers without weights ---------------------------------------------------


def test_inspect_hub_repo_reads_only_headers(hub: FakeHub, models, tmp_path: Path) -> None:
    commit = hub.add("org/sharded", models["llama-sharded"])
    shards = sorted(p.name for p in models["llama-sharded"].glob("*.safetensors"))
    assert len(shards) > 1
    r = qcli(hub, tmp_path / "hf", "inspect", "org/sharded", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["source"]["repo_id"] == "org/sharded"
    assert body["source"]["revision"] == commit
    local = _local_json(models["llama-sharded"])
    assert [t["name"] for t in body["tensors"]] == [t["name"] for t in local["tensors"]]
    assert body["parameters"] == local["parameters"]
    # Only each shard's header crossed the wire, one range request each: no weights.
    got = [s for s in hub.log if s.path.endswith(".safetensors")]
    assert sorted(s.path.rsplit("/", 1)[1] for s in got) == shards
    assert all(s.status == 206 and s.sent <= FIRST_RANGE for s in got)
    # ...and no safetensors file was written to the cache.
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def _local_json(folder: Path) -> dict:
    import io
    from contextlib import redirect_stdout

    from qcli.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["inspect", str(folder), "--json"]) == 0
    return json.loads(buf.getvalue())


def test_revision_plan_and_offline_reuse(hub: FakeHub, models, tmp_path: Path) -> None:
    hub.add("org/m", models["llama"])
    v2 = hub.add("org/m", models["qwen2"], ref="v2")
    home = tmp_path / "hf"
    args = ("inspect", "org/m", "--revision", "v2", "--lm-head", "--json")
    r = qcli(hub, home, *args)
    assert r.returncode == 0, r.stderr
    online = json.loads(r.stdout)
    assert online["source"]["revision"] == v2 and online["model_type"] == "qwen2"
    assert online["source"]["headers_fetched"] == ["model.safetensors"]
    plan = online["plan"]
    assert plan["lm_head"] == "quantized" and plan["untie_lm_head"]
    # Offline, the same question is answered from the cache, without a single request.
    seen = len(hub.log)
    r = qcli(hub, home, *args, offline=True)
    assert r.returncode == 0, r.stderr
    offline = json.loads(r.stdout)
    assert len(hub.log) == seen
    assert offline["source"]["headers_cached"] == ["model.safetensors"]
    for key in ("tensors", "modules", "plan", "parameters"):
        assert offline[key] == online[key], key
    # A revision never read online is not in the cache: one line, exit code 2.
    r = qcli(hub, home, "inspect", "org/m", offline=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not in the local cache" in r.stderr


def test_hub_errors_are_one_line(hub: FakeHub, models, tmp_path: Path) -> None:
    hub.add("org/m", models["llama"])
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(load_config(models["llama"])))
    (no_weights / "pytorch_model.bin").write_bytes(b"not read")
    hub.add("org/pickle", no_weights)
    cases = [
        (["org/none"], "no such repo"),
        (["org/m", "--revision", "nope"], "no revision 'nope'"),
        (["org/pickle"], "no model.safetensors"),
        (["not a repo"], "not a hub repo id"),
    ]
    for args, message in cases:
        r = qcli(hub, tmp_path / "hf", "inspect", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_unreachable_hub_fails_fast_without_retry_lines(tmp_path: Path) -> None:
    """No network: one request without retries tells, then the one-line error (inspect
    took 23 s and printed 11 retry lines through huggingface_hub's own downloads)."""
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = FakeHub(url=f"http://127.0.0.1:{port}")
    for cmd in (["inspect", "org/m"], ["quantize", "org/m", str(tmp_path / "out")]):
        t0 = time.monotonic()
        r = qcli(dead, tmp_path / "hf", *cmd)
        assert time.monotonic() - t0 < 15, r.stderr
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot be reached" in r.stderr and "Retrying" not in r.stderr


def test_large_header_takes_a_second_range(hub: FakeHub, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "many"
    folder.mkdir()
    n = 2500  # ~95 header bytes per tensor: the header outgrows the first 100 kB range
    tensors = {f"model.layers.{i}.input_layernorm.weight": torch.ones(4) for i in range(n)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    hub.add("org/many", folder)
    r = qcli(hub, tmp_path / "hf", "inspect", "org/many", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert len(body["tensors"]) == n and body["parameters"] == 4 * n
    # no Linear layer: the summary stands and the plan says why there is none (exit 0)
    assert body["plan"] is None and body["plan_error"]
    gets = [s for s in hub.log if s.path.endswith(".safetensors")]
    assert [s.status for s in gets] == [206, 206]
    assert sum(s.sent for s in gets) < (folder / "model.safetensors").stat().st_size


def test_quantized_repo_on_the_hub(hub: FakeHub, models, tmp_path: Path) -> None:
    from qcli.cli import main

    out = tmp_path / "w8a8"
    assert main(["quantize", str(models["llama"]), str(out), "--lm-head", "-q"]) == 0
    hub.add("org/m-W8A8", out)
    r = qcli(hub, tmp_path / "hf", "inspect", "org/m-W8A8", "--json")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)["quantization"]
    assert [g["scheme"] for g in q["groups"]] == ["W8A8"] and q["lm_head"] == "quantized"
    assert q["compression_ratio"] > 1.5
    # verify's checks read the scales' values, which stay on the hub: said, not faked
    assert q["contract"] is None and "not downloaded" in q["contract_error"]
    r = qcli(hub, tmp_path / "hf", "inspect", "org/m-W8A8")
    assert r.returncode == 0 and "W8A8" in r.stdout and "lm_head: quantized" in r.stdout


def test_dry_run_from_hub_downloads_no_weights(hub: FakeHub, models, tmp_path: Path) -> None:
    hub.add("org/m", models["llama-sharded"])
    out = tmp_path / "out"
    r = qcli(hub, tmp_path / "hf", "quantize", "org/m", str(out), "--dry-run", "--lm-head")
    assert r.returncode == 0, r.stderr
    assert "lm_head: quantized" in r.stdout and "nothing written" in r.stdout
    assert not out.exists()
    assert all(s.status == 206 for s in hub.log if s.path.endswith(".safetensors"))


# --- qcli.source: quantize from a hub repo id ---------------------------------------------


def test_quantize_from_hub_then_offline_with_revision(hub: FakeHub, models, tmp_path: Path) -> None:
    hub.add("org/m", models["llama"])
    v2 = hub.add("org/m", models["qwen2"], ref="v2")
    home = tmp_path / "hf"
    # Online: qcli.source downloads revision v2 through the real client, then quantizes it.
    online = tmp_path / "online"
    r = qcli(hub, home, "quantize", "org/m", str(online), "--revision", "v2", "--lm-head", "-q")
    assert r.returncode == 0, r.stderr
    provenance = json.loads((online / "qcli_provenance.json").read_text())
    assert provenance["source"] == {"repo_id": "org/m", "revision": v2}
    assert load_config(online)["model_type"] == "qwen2"
    # Offline: the same revision comes from the cache, with no request at all, and the
    # output is byte-identical.
    hub.log.clear()
    offline = tmp_path / "offline"
    r = qcli(
        hub, home, "quantize", "org/m", str(offline), "--revision", "v2", "--lm-head", "-q",
        offline=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert hub.log == []
    assert sorted(p.name for p in offline.iterdir()) == sorted(p.name for p in online.iterdir())
    for f in online.iterdir():
        assert (offline / f.name).read_bytes() == f.read_bytes(), f.name
    # The downloaded snapshot also serves inspect offline: headers read from the cache.
    r = qcli(hub, home, "inspect", "org/m", "--revision", "v2", "--json", offline=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"]["headers_cached"] == ["model.safetensors"]
    assert hub.log == []
    # An unknown repo offline: one line, exit code 2, nothing written.
    r = qcli(hub, home, "quantize", "org/unknown", str(tmp_path / "x"), offline=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not in the local cache" in r.stderr and not (tmp_path / "x").exists()
