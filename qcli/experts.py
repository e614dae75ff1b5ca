"""MoE experts stored fused on disk (one 3-D tensor for every expert of a layer), split into
the per-expert 2-D weights vLLM and transformers load quantized.

Layouts read (transformers 5.24 saves them so; orientation and gate/up order checked
numerically against its modules by tests/test_fused_experts.py):

- **Llama 4** (`llama4`, `llama4_text`): `feed_forward.experts.gate_up_proj` ``[E, H, 2I]``
  and `experts.down_proj` ``[E, I, H]``, no `.weight` suffix, stored ``[in, out]`` (the
  model multiplies ``x @ w``), gate first in `gate_up_proj`. Split: ``experts.<e>.gate_proj
  .weight = gate_up[e][:, :I].T`` and so on. With a compressed-tensors config transformers
  builds these experts as a list of Linear modules (SequentialLlama4TextExperts) and needs
  exactly these names; vLLM's llama4 loader maps them onto its fused experts. A Llama 4
  output is therefore always split, its experts quantized or not.
- **GraniteMoE** (`granitemoe`, `granitemoeshared`, `granitemoehybrid`): `block_sparse_moe
  .input_linear.weight` ``[E, 2I, H]`` (gate first) and `output_linear.weight` ``[E, H, I]``,
  ``[out, in]``: the split is row ranges, no transpose. vLLM loads the split names; transformers
  5.24 has no mapping back from them (qcli.loaders.GRANITE_SPLIT), so its experts are split
  only when some are quantized: left dense, the fused tensors are copied as they are.

Other fused layouts (DBRX's `w1/v1/w2`, gpt-oss's interleaved `gate_up_proj` with biases)
are refused by qcli.kinds with what they are. Everything here is headers only (no torch
at import): :meth:`Piece.rows` computes a split weight's rows when it is read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcli import kinds
from qcli.tensors import TensorInfo

if TYPE_CHECKING:
    import torch

FAMILY = "fused experts"
LLAMA4 = frozenset({"llama4", "llama4_text"})
GRANITE = frozenset({"granitemoe", "granitemoeshared", "granitemoehybrid"})
_LLAMA4_NAME = re.compile(r"(?P<p>.*\.experts)\.(?P<leaf>gate_up_proj|down_proj)")
_GRANITE_NAME = re.compile(r"(?P<p>.*\.block_sparse_moe)\.(?P<leaf>input|output)_linear\.weight")
_READ_ROWS = 4 << 20  # source bytes read at once when a transposed piece gathers columns


@dataclass(frozen=True)
class Piece:
    """One expert's projection, cut out of a fused tensor: ``[out, in]`` rows.

    The fused tensor is seen as 2-D, ``[E * A, B]``; expert `expert` owns rows
    ``[expert * A, (expert + 1) * A)``. Untransposed, the piece is rows ``offset + r`` of
    that block; transposed, it is columns ``offset + r`` (so row r of the piece reads one
    element of each of the A rows).
    """

    source: TensorInfo  # the fused tensor, as stored ([E, A, B])
    expert: int
    offset: int  # first row (untransposed) or column (transposed) of this projection
    size: int  # rows of the piece (its out_features)
    transposed: bool
    always_split: bool  # the loaders need the split names even when it stays dense

    family = FAMILY

    @property
    def whole(self) -> bool:
        """Read in one block: a transposed piece gathers a column of every source row, so
        reading it in row blocks would read the expert's bytes once per block."""
        return self.transposed

    @property
    def shape(self) -> tuple[int, int]:
        _, a, b = self.source.shape
        return (self.size, a) if self.transposed else (self.size, b)

    def describe(self) -> str:
        how = ", transposed" if self.transposed else ""
        return f"split from {self.source.name} (expert {self.expert}{how})"

    def info(self, name: str) -> TensorInfo:
        """The piece as a tensor of its own: its shape, and as many bytes as it holds, from
        the start of its expert's block (for accounting and read-ahead: reads go through
        :meth:`rows`)."""
        e, a, b = self.source.shape
        block = self.source.nbytes // e
        start = self.source.start + self.expert * block
        rows, cols = self.shape
        end = start + rows * cols * (block // (a * b))
        return dataclasses.replace(self.source, name=name, shape=self.shape, start=start, end=end)

    def flat(self) -> TensorInfo:
        e, a, b = self.source.shape
        return dataclasses.replace(self.source, shape=(e * a, b))

    def rows(
        self, read: Callable[[TensorInfo, int, int], torch.Tensor], r0: int, r1: int
    ) -> torch.Tensor:
        """Rows [r0, r1) of the piece, in the source's dtype."""
        flat = self.flat()
        a = self.source.shape[1]
        base = self.expert * a
        if not self.transposed:
            return read(flat, base + self.offset + r0, base + self.offset + r1)
        import torch

        b = self.source.shape[2]
        step = max(1, _READ_ROWS // max(1, b * 2))
        parts = [
            read(flat, base + h, base + min(a, h + step))[:, self.offset + r0 : self.offset + r1]
            for h in range(0, a, step)
        ]
        return torch.cat(parts).t().contiguous()


def split(tensors: Mapping[str, TensorInfo], config: Mapping[str, Any]) -> dict[str, Piece]:
    """Every per-expert weight hidden in a fused tensor, by the name it is written under
    (`<...>.experts.<e>.<proj>.weight`); {} for a checkpoint without fused experts."""
    types = kinds.model_types(config)
    if types & LLAMA4:
        return _llama4(tensors)
    if types & GRANITE:
        return _granite(tensors)
    return {}


def view(
    tensors: Mapping[str, TensorInfo], config: Mapping[str, Any]
) -> tuple[dict[str, TensorInfo], dict[str, Piece]]:
    """The tensors as the model's modules see them: each fused expert tensor replaced, in
    place, by its per-expert pieces (what kinds, the matcher, the plan and the checks read),
    and the pieces themselves."""
    pieces = split(tensors, config)
    if not pieces:
        return dict(tensors), pieces
    by_source: dict[str, list[str]] = {}
    for name, piece in pieces.items():
        by_source.setdefault(piece.source.name, []).append(name)
    out: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name in by_source:
            out.update({n: pieces[n].info(n) for n in by_source[name]})
        else:
            out[name] = info
    return out, pieces


def sources(pieces: Mapping[str, Piece]) -> set[str]:
    """The fused tensors the pieces come from."""
    return {p.source.name for p in pieces.values()}


def _llama4(tensors: Mapping[str, TensorInfo]) -> dict[str, Piece]:
    found: dict[str, Piece] = {}
    for name, t in tensors.items():
        m = _LLAMA4_NAME.fullmatch(name)
        if m is None or len(t.shape) != 3:
            continue
        e, a, b = t.shape
        p = m["p"]
        for i in range(e):
            if m["leaf"] == "gate_up_proj":  # [E, H, 2I]: gate columns first
                half = b // 2
                found[f"{p}.{i}.gate_proj.weight"] = Piece(t, i, 0, half, True, True)
                found[f"{p}.{i}.up_proj.weight"] = Piece(t, i, half, half, True, True)
            else:  # [E, I, H]
                found[f"{p}.{i}.down_proj.weight"] = Piece(t, i, 0, b, True, True)
    return found


def _granite(tensors: Mapping[str, TensorInfo]) -> dict[str, Piece]:
    found: dict[str, Piece] = {}
    for name, t in tensors.items():
        m = re.fullmatch(
            r"(?P<p>.*\.block_sparse_moe)\.(?P<leaf>input|output)_linear\.weight", name
        )
        if m is None or len(t.shape) != 3:
            continue
        e, a, _ = t.shape
        p = f"{m['p']}.experts"
        for i in range(e):
            if m["leaf"] == "input":  # [E, 2I, H]: gate rows first
                half = a // 2
                found[f"{p}.{i}.gate_proj.weight"] = Piece(t, i, 0, half, False, False)
                found[f"{p}.{i}.up_proj.weight"] = Piece(t, i, half, half, False, False)
            else:  # [E, H, I]
                found[f"{p}.{i}.down_proj.weight"] = Piece(t, i, 0, a, False, False)
    return found
