"""Weights a source stores quantized, and their dense values: what qcli re-quantizes from.

Two families of quantized releases are read:

- **block FP8** (DeepSeek-V3/R1, the Qwen3-*-FP8 releases, ...): `M.weight` float8_e4m3fn
  ``[out, in]`` and `M.weight_scale_inv` float32 ``[ceil(out/b0), ceil(in/b1)]``, config
  ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size":
  [b0, b1], ...}`` (b0 = b1 = 128 in every release seen). The dense weight is
  ``w[i, j] = q[i, j] * scale_inv[i // b0, j // b1]`` (edge blocks partial), as DeepSeek's
  own ``weight_dequant`` computes it;
- **compressed-tensors per channel**, int8 or fp8 (qcli's own W8A8 / FP8_DYNAMIC output):
  `M.weight` ``[out, in]`` and `M.weight_scale` ``[out, 1]``: ``w[i, j] = q[i, j] * s[i]``.

Detection and shapes need headers only (no torch); :meth:`Stored.rows` computes the dense
values of a block of rows, in float32, exactly (every product of an e4m3 or int8 value and a
float32 scale is exact in float32... to one rounding, the same one the releases' own code
makes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcli import layout
from qcli.errors import CheckpointError, InputError
from qcli.tensors import Checkpoint, TensorInfo

if TYPE_CHECKING:
    import torch

BLOCK_FP8 = "fp8 e4m3 with block scales"
CHANNEL = "compressed-tensors, per-channel scales"
# The scale tensors each family stores next to its weights (consumed, never copied).
SCALE_NAMES = ("weight_scale_inv", "weight_scale")


@dataclass(frozen=True)
class Stored:
    """One weight a source stores quantized."""

    weight: TensorInfo  # F8_E4M3 or I8, [out, in]
    scale: TensorInfo  # F32/BF16/F16 (or E8M0, ue8m0 releases): [ceil(out/b0), ceil(in/b1)]
    # or [out, 1]
    block: tuple[int, int]  # rows, columns one scale covers (per channel: (1, in))
    family: str

    whole = False  # read in row blocks, as a dense weight

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1])

    def describe(self) -> str:
        if self.family == BLOCK_FP8:
            b0, b1 = self.block
            return f"re-quantized from fp8 e4m3 with {b0}x{b1} block scales"
        return f"re-quantized from {self.weight.dtype} with per-channel scales"

    def rows(
        self, read: Callable[[TensorInfo, int, int], torch.Tensor], r0: int, r1: int
    ) -> torch.Tensor:
        """Dense float32 rows [r0, r1): ``q * scale`` of each element's block."""
        import torch

        b0, b1 = self.block
        q = read(self.weight, r0, r1).to(torch.float32)
        s = read(self.scale, r0 // b0, -(-r1 // b0)).to(torch.float32)
        cols = q.shape[1]
        if self.block[1] < cols:  # expand block columns, trim the partial edge block
            s = s.repeat_interleave(b1, dim=1)[:, :cols]
        if b0 > 1:
            s = s.repeat_interleave(b0, dim=0)
            first = r0 - (r0 // b0) * b0
            s = s[first : first + (r1 - r0)]
        return q.mul_(s)


def find(ck: Checkpoint) -> dict[str, Stored]:
    """Every weight the checkpoint stores quantized (by weight tensor name), or {} for a dense
    one. Raises InputError for a quantization qcli cannot read back."""
    qc = (ck.config or {}).get("quantization_config")
    if not qc:
        return {}
    if not isinstance(qc, Mapping):
        raise InputError("config.json: quantization_config is not an object")
    method = qc.get("quant_method")
    if method in ("fp8", "compressed-tensors"):
        found = _block_fp8(ck, qc) if method == "fp8" else _per_channel(ck, qc)
        if not found:
            # a config that disagrees with its tensors: which one is wrong is not ours to guess
            raise InputError(
                f"{ck.folder} is marked already quantized (quantization_config: {method!r}) but"
                " stores no quantized weight; remove quantization_config from config.json if"
                " its weights are dense"
            )
        return found
    raise InputError(
        f"{ck.folder} is already quantized with {method!r}; qcli re-quantizes block-fp8"
        " releases and compressed-tensors int8/fp8 per-channel checkpoints, or dense ones"
    )


def is_release(ck: Checkpoint) -> bool:
    """A block-fp8 release (quant_method fp8): quantized by its publisher, not in the
    compressed-tensors format that qcli writes and verify checks."""
    qc = (ck.config or {}).get("quantization_config")
    # config_groups: a compressed-tensors config whose quant_method was changed (broken)
    return isinstance(qc, Mapping) and qc.get("quant_method") == "fp8" and "config_groups" not in qc


def _block_fp8(ck: Checkpoint, qc: Mapping[str, Any]) -> dict[str, Stored]:
    fmt = qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size")
    if fmt != "e4m3" or not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise InputError(
            f"{ck.folder} is already quantized with fp8 (fmt {fmt!r}, weight_block_size"
            f" {block!r}); qcli re-quantizes e4m3 weights with [rows, columns] block scales"
        )
    found = {}
    for name, t in ck.tensors.items():
        if not name.endswith(".weight") or t.dtype != "F8_E4M3":
            continue
        scale = ck.tensors.get(name.removesuffix("weight") + "weight_scale_inv")
        if scale is None:
            raise CheckpointError(f"{name} is fp8 but has no weight_scale_inv next to it")
        out_f, in_f = t.shape
        want = (math.ceil(out_f / block[0]), math.ceil(in_f / block[1]))
        if tuple(scale.shape) != want or scale.dtype not in ("F32", "BF16", "F16", "F8_E8M0"):
            raise CheckpointError(
                f"{scale.name} is {scale.dtype}{list(scale.shape)}; {list(t.shape)} weights with"
                f" {block[0]}x{block[1]} blocks need float [{want[0]}, {want[1]}]"
            )
        found[name] = Stored(t, scale, (block[0], block[1]), BLOCK_FP8)
    return found


def _per_channel(ck: Checkpoint, qc: Mapping[str, Any]) -> dict[str, Stored]:
    found = {}
    for name, t in ck.tensors.items():
        leaf = name.rpartition(".")[2]
        if leaf == layout.PACKED:
            raise InputError(
                f"{ck.folder} is already quantized with packed weights ({name}); qcli"
                " re-quantizes int8/fp8 per-channel checkpoints (int-, float- or"
                " naive-quantized), not pack-quantized ones"
            )
        if leaf != layout.WEIGHT or t.dtype not in ("F8_E4M3", "I8"):
            continue
        scale = ck.tensors.get(name.removesuffix(layout.WEIGHT) + layout.SCALE)
        if scale is None or tuple(scale.shape) != (t.shape[0], 1):
            raise CheckpointError(
                f"{name} is {t.dtype} without a per-channel weight_scale [{t.shape[0]}, 1]"
                " next to it (qcli reads per-channel scales only)"
            )
        found[name] = Stored(t, scale, (1, t.shape[1]), CHANNEL)
    return found


def dense(stored: Stored, read: Callable[[TensorInfo, int, int], torch.Tensor]) -> torch.Tensor:
    """The whole dense float32 weight."""
    return stored.rows(read, 0, stored.shape[0])


def consumed(stored: Mapping[str, Stored]) -> set[str]:
    """The scale tensors the stored weights use up: they have no place in the output."""
    return {s.scale.name for s in stored.values()}
