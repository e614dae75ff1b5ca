"""Each compressed-tensors format's tensors on disk: names, dtypes, shapes and packing.

The one place that knows how a quantized Linear ``M`` with a dense weight ``[out, in]`` is
stored (shared/format.md, checked against compressed-tensors 0.20 by tests/interop):

| format                          | tensors                                                  |
| ------------------------------- | -------------------------------------------------------- |
| int-quantized                   | ``M.weight`` I8 [out, in], ``M.weight_scale`` [out, 1]    |
| float-quantized, naive (fp8)    | ``M.weight`` F8_E4M3 [out, in], ``M.weight_scale``        |
| naive-quantized (int8)          | ``M.weight`` I8 [out, in], ``M.weight_scale``             |
| pack-quantized (8 bit)          | ``M.weight_packed`` I32 [out, in/4], ``M.weight_scale``,  |
|                                 | ``M.weight_shape`` I64 [2] = [out, in]                    |

The writer (planner and convert) asks it which slots to write and how to encode ``q``; the
readers (checks, verify, inspect) ask it which tensors to expect and how to decode them. No
torch at import time: inspect uses it on headers alone.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qcli.shards import Slot
from qcli.tensors import FLOAT_DTYPES, TensorInfo

if TYPE_CHECKING:
    import torch

WEIGHT, PACKED, SCALE, SHAPE = "weight", "weight_packed", "weight_scale", "weight_shape"
ZERO_POINT, INPUT_SCALE = "weight_zero_point", "input_scale"
# Every parameter name compressed-tensors gives a quantized Linear besides `weight`.
QUANT_PARAMS = (PACKED, SCALE, SHAPE, ZERO_POINT, INPUT_SCALE)
# Parameters that describe storage, not the model (not counted as parameters).
AUX_PARAMS = (SCALE, SHAPE, ZERO_POINT, INPUT_SCALE)
SCALE_DTYPES = ("F32", "BF16", "F16")
INT8, FP8, INT32 = "I8", "F8_E4M3", "I32"


@dataclass(frozen=True)
class Layout:
    """How one format stores a quantized Linear's weight."""

    format: str
    weight_param: str  # WEIGHT or PACKED
    weight_dtype: str  # safetensors dtype of the stored weight

    @property
    def packed(self) -> bool:
        return self.weight_param == PACKED

    def stored_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The stored weight's shape for a dense ``[out, in]``: 4 int8 values per int32."""
        out_f, in_f = shape
        return (out_f, -(-in_f // 4)) if self.packed else (out_f, in_f)

    def slots(self, module: str, shape: tuple[int, int], scale_dtype: str) -> list[Slot]:
        """The tensors module `module` of dense weight `shape` is written as, weight first."""
        slots = [
            Slot(f"{module}.{self.weight_param}", self.weight_dtype, self.stored_shape(shape)),
            Slot(f"{module}.{SCALE}", scale_dtype, (shape[0], 1)),
        ]
        if self.packed:
            slots.append(Slot(f"{module}.{SHAPE}", "I64", (2,)))
        return slots

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Quantized values ``q`` (int8 / e4m3 ``[rows, in]``) as stored."""
        if not self.packed:
            return q
        return pack_int8(q)

    def decode(self, stored: torch.Tensor, in_features: int) -> torch.Tensor:
        """The quantized values of stored rows: what :meth:`encode` took."""
        if not self.packed:
            return stored
        return unpack_int8(stored, (stored.shape[0], in_features))

    def shape_tensor(self, shape: tuple[int, int]) -> torch.Tensor:
        """The ``weight_shape`` tensor of a packed weight."""
        import torch

        return torch.tensor(list(shape), dtype=torch.int64)


_LAYOUTS: dict[tuple[str, str], Layout] = {
    ("int-quantized", "int"): Layout("int-quantized", WEIGHT, INT8),
    ("float-quantized", "float"): Layout("float-quantized", WEIGHT, FP8),
    ("naive-quantized", "int"): Layout("naive-quantized", WEIGHT, INT8),
    ("naive-quantized", "float"): Layout("naive-quantized", WEIGHT, FP8),
    ("pack-quantized", "int"): Layout("pack-quantized", PACKED, INT32),
}


def of(format: str | None, weight_type: str | None) -> Layout | None:
    """The layout of `format` for weights of compressed-tensors type `weight_type` ("int",
    "float"), or None where the format cannot store such weights (or is none qcli knows)."""
    return _LAYOUTS.get((format or "", weight_type or ""))


def scale_dtype(weight_dtype: str) -> str:
    """A scale is stored in the weight's own float dtype (float32 for anything else)."""
    return weight_dtype if weight_dtype in SCALE_DTYPES else "F32"


def is_quant_tensor(name: str, dtype: str) -> bool:
    """Whether a tensor only a quantized checkpoint has: a quantization parameter, or a
    `weight` stored as something other than floats."""
    leaf = name.rpartition(".")[2]
    return leaf in QUANT_PARAMS or (leaf == WEIGHT and dtype not in FLOAT_DTYPES)


def proves_quantized(name: str, dtype: str) -> bool:
    """A tensor that no dense checkpoint holds: an fp8 tensor, or a quantization parameter
    (but `weight_shape`, a name a dense model may use for a tensor of its own)."""
    leaf = name.rpartition(".")[2]
    return dtype.startswith("F8") or (leaf in QUANT_PARAMS and leaf != SHAPE)


def is_aux(name: str) -> bool:
    return name.rpartition(".")[2] in AUX_PARAMS


def state(module: str, tensors: Mapping[str, TensorInfo]) -> str:
    """ "quantized", "dense" or "absent": how `module` is stored in `tensors`."""
    prefix = f"{module}." if module else ""
    w = tensors.get(prefix + WEIGHT)
    quantized = w is not None and w.dtype not in FLOAT_DTYPES
    if quantized or any(prefix + p in tensors for p in QUANT_PARAMS):
        return "quantized"
    return "dense" if w is not None else "absent"


def dense_numel(name: str, shape: tuple[int, ...]) -> int:
    """Model parameters a stored weight tensor holds (a packed int32 word holds four)."""
    n = 1
    for d in shape:
        n *= d
    return 4 * n if name.rpartition(".")[2] == PACKED else n


# --- 8-bit packing (pack-quantized) --------------------------------------------------


def _pack_bytes_arith(u: torch.Tensor) -> torch.Tensor:
    import torch

    # Endian-independent: word = u0 | u1 << 8 | u2 << 16 | u3 << 24, wrapped to int32.
    u = u.to(torch.int64).view(u.shape[0], -1, 4)
    word = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16) | (u[..., 3] << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _unpack_bytes_arith(packed: torch.Tensor) -> torch.Tensor:
    import torch

    p = packed.to(torch.int64) & 0xFFFFFFFF
    parts = [(p >> (8 * k)) & 0xFF for k in range(4)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1).to(torch.uint8)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 ``[out, in]`` into int32 ``[out, ceil(in / 4)]`` (pack-quantized, 8 bit).

    ``u = q + 128`` as a byte; element ``j`` of a row goes into word ``j // 4`` at
    bit offset ``8 * (j % 4)``; words are read as int32 (two's complement).
    When ``in`` is not a multiple of 4 the last word is padded with zero bytes
    (``u = 0``), exactly what compressed-tensors' ``pack_to_int32(q, 8)`` does;
    format.md requires ``in % 4 == 0`` for vLLM, which is the caller's check.
    """
    import torch

    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError(f"expected a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    rows, cols = q.shape
    words = -(-cols // 4)
    u = torch.zeros(rows, words * 4, dtype=torch.uint8)
    # q + 128 mod 256 is flipping the sign bit of the two's complement byte.
    torch.bitwise_xor(q.view(torch.uint8), 0x80, out=u[:, :cols])
    if sys.byteorder == "little":
        return u.view(torch.int32)
    return _pack_bytes_arith(u)


def unpack_int8(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_int8`: int32 ``[out, ceil(in / 4)]`` -> int8 ``shape``.

    Padding bytes past ``in`` are ignored, as in compressed-tensors'
    ``unpack_from_int32(packed, 8, shape)``.
    """
    import torch

    rows, cols = (int(d) for d in shape)
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"expected a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != rows or packed.shape[1] != -(-cols // 4):
        raise ValueError(
            f"packed shape {tuple(packed.shape)} does not match weight shape {(rows, cols)}"
        )
    if sys.byteorder == "little":
        u = packed.contiguous().view(torch.uint8)
    else:
        u = _unpack_bytes_arith(packed)
    return torch.bitwise_xor(u[:, :cols], 0x80).view(torch.int8)
