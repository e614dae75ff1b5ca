"""Numbers for people: one set of formatters for every command's tables and lines."""

from __future__ import annotations

import math


def size(n: float) -> str:
    """Bytes with three significant digits ("131 KB", "66.6 KB", "1.21 GB"), decimal units."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 99.95 else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def count(n: int) -> str:
    """A parameter count: "1.71M", "135M", "7.24B"."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def num(v: float, spec: str) -> str:
    """`v` formatted with `spec`, or "inf" / "nan" as such."""
    return format(v, spec) if math.isfinite(v) else str(v)


def rate(nbytes: float, seconds: float) -> str:
    return f"{size(nbytes / max(seconds, 1e-9))}/s"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
