"""Which output file each tensor goes to: fixed by the plan, before any weight is read.

A module's tensors stay together, files fill in the plan's order up to --max-shard-size, and
the names are transformers' (`model-00001-of-00003.safetensors`; one file is
`model.safetensors`, with no index). Every machine computing a plan gets the same shards.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qcli.errors import InputError
from qcli.tensors import SINGLE_NAME

if TYPE_CHECKING:
    from qcli.planner import Plan, TensorPlan


def shard_layout(plan: Plan, max_shard_size: int) -> list[tuple[str, list[TensorPlan]]]:
    """Split the tensor plans into output files, in order, a module's tensors kept together."""
    if max_shard_size <= 0:
        raise InputError("--max-shard-size: the size must be positive")
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tp in plan.tensors:
        if shards[-1] and size + tp.bytes_out > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tp)
        size += tp.bytes_out
    n = len(shards)
    if n == 1:
        return [(SINGLE_NAME, shards[0])]
    width = max(5, int(math.log10(n)) + 1)
    return [
        (f"model-{i + 1:0{width}d}-of-{n:0{width}d}.safetensors", s) for i, s in enumerate(shards)
    ]


def oversized(plan: Plan, max_shard_size: int) -> TensorPlan | None:
    """The largest tensor when it does not fit in one shard of `max_shard_size` bytes."""
    largest = max(plan.tensors, key=lambda tp: tp.bytes_out)
    return largest if largest.bytes_out > max_shard_size else None


def parse_size(text: str, option: str = "size") -> int:
    """ "5GB", "500MB", "2GiB", "1000000" -> bytes (decimal units as transformers uses);
    errors name `option`."""
    t = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    unit = next((u for u in units if t.endswith(u)), "B")
    num, mult = t.removesuffix(unit), units[unit]
    try:
        value = float(num)
    except ValueError:
        raise InputError(f"{option}: cannot read size {text!r} (e.g. 5GB, 500MB)") from None
    if not math.isfinite(value) or value <= 0 or int(value * mult) < 1:
        raise InputError(f"{option}: the size must be positive, got {text!r}")
    return int(value * mult)
