"""The few small tensors whose values the contract constrains (scales, packed shapes), read as
raw bytes: no torch, so `inspect` runs the checks too."""

from __future__ import annotations

import array
import os
import struct
import sys

from qcli.errors import CheckpointError
from qcli.tensors import TensorInfo

# Bit pattern of +inf per dtype: a float is finite and > 0 exactly when its bits, read as an
# unsigned integer, lie strictly between 0 (+0.0) and +inf's (negatives have the sign bit set,
# NaNs lie above +inf). That lets the check run on array min/max at C speed, no torch needed.
_INF_BITS = {"F32": ("I", 0x7F800000), "BF16": ("H", 0x7F80), "F16": ("H", 0x7C00)}


def read_raw(info: TensorInfo) -> bytes:
    """A tensor's bytes as stored (little-endian)."""
    fd = os.open(info.file, os.O_RDONLY)
    try:
        data = os.pread(fd, info.nbytes, info.start)
    finally:
        os.close(fd)
    if len(data) != info.nbytes:
        raise CheckpointError(f"{info.file.name}: tensor {info.name!r} is truncated")
    return data


def decode_floats(info: TensorInfo, data: bytes | None = None) -> list[float]:
    """The values of a float32 / bfloat16 / float16 tensor, as Python floats."""
    data = read_raw(info) if data is None else data
    n = len(data) // {"F32": 4, "BF16": 2, "F16": 2}[info.dtype]
    if info.dtype == "F32":
        return list(struct.unpack(f"<{n}f", data))
    if info.dtype == "F16":
        return list(struct.unpack(f"<{n}e", data))
    halves = struct.unpack(f"<{n}H", data)  # bf16 is the top half of a float32
    return list(struct.unpack(f"<{n}f", struct.pack(f"<{n}I", *(h << 16 for h in halves))))


def first_bad_scale(info: TensorInfo) -> tuple[int, float] | None:
    """(index, value) of the first entry that is not finite and > 0, or None."""
    code, inf_bits = _INF_BITS[info.dtype]
    data = read_raw(info)
    bits = array.array(code, data)
    if sys.byteorder == "big":
        bits.byteswap()
    if not bits or (min(bits) > 0 and max(bits) < inf_bits):
        return None
    i = next(i for i, b in enumerate(bits) if not 0 < b < inf_bits)
    size = bits.itemsize
    return i, decode_floats(info, data[i * size : (i + 1) * size])[0]
