"""What every result's to_json() shares: numbers JSON can hold."""

from __future__ import annotations

import math


def number(v: float | None) -> float | str | None:
    """JSON has no inf / nan: write them as strings, keep finite numbers as numbers."""
    if v is None or math.isfinite(v):
        return v
    return str(v)
