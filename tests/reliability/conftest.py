"""Fixtures for the reliability tests: real (tmpfs) mounts where this machine allows them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _mount(args: list[str]) -> str | None:
    """Run mount/umount; the error text when it fails (not root, no CAP_SYS_ADMIN, ...)."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")


@pytest.fixture
def tmpfs() -> Iterator[Callable[..., Path]]:
    """`tmpfs(path, size=..., ro=False)` mounts a small tmpfs at `path` for one test.

    A real filesystem is the only honest way to test "disk full" and "read-only location":
    running as root, chmod does not stop writes. Skips when mounting is not allowed here.
    """
    mounted: list[Path] = []

    def mount(path: Path, size: int = 1 << 20, ro: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        err = _mount(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)])
        if err:
            pytest.skip(f"cannot mount a tmpfs here: {err}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        _mount(["umount", "-l", str(path)])
