"""Shared helpers for the reliability tests: checksummed trees, raw safetensors files, and
the CLI run in-process with its exit code and output."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qcli.cli.app import main

# Run the real console entry point in a child process (for signals, rlimits, concurrency).
QCLI = [sys.executable, "-c", "from qcli.cli.app import run; run()"]


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones included) -> a digest of what it is and holds.

    Comparing two states shows at once that an input was not modified and that nothing was
    left behind (an output folder, a temporary folder, a lock file) next to it.
    """
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                state[rel] = "dir"
            elif not p.is_file():  # a FIFO or socket: opening it could block
                state[rel] = f"special:{oct(p.stat().st_mode)}"
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                state[rel] = f"file:{h.hexdigest()}:{oct(p.stat().st_mode & 0o7777)}"
    return state


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`qcli ARGV` in this process: (exit code, stdout, stderr). main() must never raise."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> str:
    """stderr holds exactly one line, a qcli error naming every needle, and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("qcli: error: "), line
    assert "Traceback" not in err and "internal error" not in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def write_raw(path: Path, header: Any, data: bytes = b"", hlen: int | None = None) -> Path:
    """A safetensors file from an arbitrary header object and data bytes (may be invalid)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + data)
    return path


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict, data bytes) of a valid safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def rewrite_header(path: Path, edit) -> Path:
    """Apply `edit(header)` (in place) to a safetensors file's header, keeping its data."""
    header, data = read_raw(path)
    edit(header)
    return write_raw(path, header, data)


def spawn(argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [*QCLI, *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def leftovers(parent: Path, out_name: str) -> list[str]:
    """qcli's own hidden entries for OUT (temporary folder, lock, replaced copy) in `parent`."""
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.qcli"))
