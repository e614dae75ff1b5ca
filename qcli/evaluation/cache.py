"""The reference pass's results, kept on disk: what the quantized pass needs for exact KL.

As llama.cpp's `--kl-divergence-base` file does, the reference model's log-probabilities of
every scored position are written once (float32, ``[tokens, vocab]``), so the quantized model
runs later with the reference out of memory; the same reference, text and settings reuse it.
Windows are read back one at a time with pread: memory stays at one window.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcli import __version__, cache
from qcli.tensors import buffer_of

LOGPROBS, META = "logprobs.f32", "meta.json"
# Reference passes kept: each is tokens x vocab float32 (~1 GB for 5k tokens of a 50k
# vocabulary), so the least recently used beyond these are removed when one is written.
KEEP_ENV, KEEP_DEFAULT = "QCLI_EVAL_CACHE_KEEP", 4


def key(reference: Path, windows: list[list[int]], settings: dict[str, Any]) -> str:
    """A digest of what the reference pass depends on: the reference's files (name, size,
    modification time), the token windows, dtype and engine, and qcli's version."""
    h = hashlib.sha256()
    files = sorted(p for p in reference.iterdir() if p.is_file())
    h.update(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    h.update(json.dumps(windows).encode())
    h.update(json.dumps({**settings, "qcli": __version__}, sort_keys=True).encode())
    return h.hexdigest()[:32]


@dataclass
class ReferencePass:
    """The reference's scored positions: log-probabilities, each target's nll, the argmax."""

    folder: Path
    vocab: int
    rows: list[int]  # scored positions per window
    meta: dict[str, Any]

    def read(self, window: int, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Log-probabilities ``[rows, vocab]`` of one window (its rows r0..r1)."""
        r1 = self.rows[window] if r1 is None else r1
        start = (sum(self.rows[:window]) + r0) * self.vocab * 4
        out = torch.empty(r1 - r0, self.vocab, dtype=torch.float32)
        buf = buffer_of(out)
        fd = os.open(self.folder / LOGPROBS, os.O_RDONLY)
        try:
            pos = 0
            while pos < len(buf):
                n = os.preadv(fd, [buf[pos:]], start + pos)
                if n <= 0:
                    raise OSError(f"{self.folder / LOGPROBS} is truncated")
                pos += n
        finally:
            os.close(fd)
        return out

    @property
    def nbytes(self) -> int:
        return sum(self.rows) * self.vocab * 4


def open_pass(digest: str) -> ReferencePass | None:
    """The cached reference pass for `digest`, if a complete one is there."""
    folder = cache.root() / "eval" / digest
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        size = (folder / LOGPROBS).stat().st_size
    except (OSError, ValueError):
        return None
    found = ReferencePass(folder, int(meta["vocab"]), list(meta["rows"]), meta)
    if size != found.nbytes:
        return None
    try:
        os.utime(folder / META)  # used now: the last to be pruned
    except OSError:
        pass
    return found


def keep_count() -> int:
    try:
        return max(1, int(os.environ.get(KEEP_ENV, KEEP_DEFAULT)))
    except ValueError:
        return KEEP_DEFAULT


def prune(keep: int, spare: Path | None = None) -> list[Path]:
    """Remove all but the `keep` most recently used complete passes (never `spare`, the one
    just written); returns what was removed. Temporary folders of other runs are left."""
    root = cache.root() / "eval"
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        try:
            found.append((d.joinpath(META).stat().st_mtime_ns, d))
        except OSError:
            continue  # not a complete pass (another run's temporary folder, or foreign)
    found.sort(reverse=True)
    removed = []
    for _, d in found[keep:]:
        if d != spare:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class PassWriter:
    """Writes a reference pass window by window into a temporary folder, renamed into place
    (under its digest) only when complete."""

    def __init__(self, digest: str, vocab: int):
        self.final = cache.root() / "eval" / digest
        self.tmp = self.final.with_name(f".{digest}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.vocab = vocab
        self.rows: list[int] = []
        self._fd = os.open(self.tmp / LOGPROBS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def add(self, logprobs: torch.Tensor) -> None:
        t = logprobs.float().contiguous()
        buf = buffer_of(t)
        pos = 0
        while pos < len(buf):
            pos += os.write(self._fd, buf[pos:])
        self.rows.append(t.shape[0])

    def finish(self, meta: dict[str, Any]) -> ReferencePass:
        os.close(self._fd)
        self._fd = -1
        body = {**meta, "vocab": self.vocab, "rows": self.rows}
        (self.tmp / META).write_text(json.dumps(body), encoding="utf-8")
        shutil.rmtree(self.final, ignore_errors=True)
        os.rename(self.tmp, self.final)
        prune(keep_count(), spare=self.final)
        return ReferencePass(self.final, self.vocab, self.rows, body)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        shutil.rmtree(self.tmp, ignore_errors=True)
