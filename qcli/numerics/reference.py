"""The dense checkpoint a quantized one is compared with, and where each layer's weight is.

By default it is the source qcli_provenance.json records, when it can still be read (a local
folder that still exists, or a hub snapshot in the local cache): without a reference a
wrong-but-valid scale (a row ×4) is undetectable. The note says why none was used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qcli import dequant, experts, heads, kinds, provenance
from qcli.checks import Contract, Finding, QuantModule
from qcli.dequant import Stored
from qcli.errors import InputError, QcliError
from qcli.experts import Piece
from qcli.tensors import DTYPES, FLOAT_DTYPES, Checkpoint, TensorInfo, open_checkpoint, read_rows

if TYPE_CHECKING:
    import torch

# Reads rows [r0, r1) of a tensor.
Read = Callable[[TensorInfo, int, int], "torch.Tensor"]

NO_REFERENCE = "compared with the dequantized weights (kernel and scales only)"


@dataclass(frozen=True)
class DenseWeight:
    """A reference layer's dense weight: a float tensor, or one the reference stores in
    another form (a block-fp8 release's, a fused expert's piece), decoded as the quantizer
    did."""

    info: TensorInfo
    stored: Stored | Piece | None = None
    # a piece read whole (transposed) is decoded once, not once per block of rows
    _whole: list[torch.Tensor] = field(default_factory=list, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.info.name

    def rows(self, read: Read, r0: int, r1: int) -> torch.Tensor:
        if self.stored is None:
            return read(self.info, r0, r1)
        if not self.stored.whole:
            return self.stored.rows(read, r0, r1)
        if not self._whole:
            self._whole.append(self.stored.rows(read, 0, self.stored.shape[0]))
        return self._whole[0][r0:r1]


@dataclass
class Reference:
    """A dense checkpoint to compare with, and where each quantized module's weight is in it."""

    checkpoint: Checkpoint
    origin: str  # "--reference" or "qcli_provenance.json"
    # weights it stores in another form (quantized, fused experts), by the name qcli writes
    stored: dict[str, Stored | Piece] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # as modules see them
    weights: dict[str, DenseWeight] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder


def resolve(
    out: Path, spec: str | None, use_provenance: bool, token: str | None = None
) -> tuple[Reference | None, str | None]:
    """The reference to compare with (--reference, else the recorded source), or None and
    the reason there is none."""
    if spec:
        from qcli import source

        folder, origin = source.resolve(spec, None, token).folder, "--reference"
    elif not use_provenance:
        return None, f"--no-reference: {NO_REFERENCE}"
    else:
        folder, why = recorded_source(out)
        if folder is None:
            return None, f"{why}: {NO_REFERENCE}"
        origin = provenance.NAME
    try:
        if folder.resolve() == out.resolve():
            raise InputError("the reference is the checkpoint itself")
        ck = open_checkpoint(folder)
        # a quantized source qcli reads (a block-fp8 release) is compared as decoded, fused
        # experts one expert at a time
        stored: dict[str, Stored | Piece] = dict(dequant.find(ck))
        config = {k: v for k, v in (ck.config or {}).items() if k != "quantization_config"}
        tensors, pieces = experts.view(ck.tensors, config)
        stored.update(pieces)
    except QcliError as e:
        if origin != provenance.NAME:
            raise
        # a recorded source that moved on is no reason to fail: say so, compare without it
        return None, f"the source in {provenance.NAME} is unusable ({e}): {NO_REFERENCE}"
    return Reference(ck, origin, stored, tensors), None


def recorded_source(out: Path) -> tuple[Path | None, str]:
    """The folder of the source qcli_provenance.json records, or None and why not."""
    src, why = provenance.source(out)
    if src is None:
        return None, f"no --reference, and {why}"
    if src.get("path"):
        path = Path(src["path"])
        if not path.exists():
            return None, f"the source recorded in {provenance.NAME} ({path}) no longer exists"
        if not (path / "config.json").is_file():
            return None, f"the source recorded in {provenance.NAME} ({path}) has no config.json"
        return path, ""
    repo, revision = str(src.get("repo_id")), src.get("revision")
    label = f"{repo}@{str(revision)[:12]}" if revision else repo
    try:
        from huggingface_hub import snapshot_download

        from qcli.source import ALLOW_PATTERNS

        found = snapshot_download(
            repo, revision=revision, local_files_only=True, allow_patterns=ALLOW_PATTERNS
        )
    except Exception:  # huggingface_hub raises several kinds for "not cached"
        return None, (
            f"{provenance.NAME} records hub repo {label}, which is not in the local cache"
            f" (--reference {repo} downloads it)"
        )
    return Path(found), ""


def match(ref: Reference, modules: Sequence[QuantModule], contract: Contract | None = None) -> None:
    """Find each module's dense weight in the reference; a module absent or shaped otherwise
    there is a finding about the checkpoint (added to `contract`). Raises InputError when
    nothing matches (the reference is another model)."""
    ck = ref.checkpoint
    tensors = ref.tensors
    embedding = _embedding_table(ck, tensors)
    problems: list[Finding] = []
    for qm in modules:
        name = f"{qm.name}.weight"
        info = tensors.get(name)
        if info is None and qm.role == "lm_head" and embedding is not None:
            # a tied source: qcli wrote lm_head from the embedding table (untied on output)
            info = embedding
            ref.notes[qm.name] = f"tied source: compared with {embedding.name}"
        if info is None:
            problems.append(
                Finding(
                    "reference.missing",
                    qm.name,
                    f"the reference {ref.folder} has no {name}",
                    "this layer cannot be compared with its source",
                )
            )
            continue
        stored = ref.stored.get(info.name)
        shape = stored.shape if stored else tuple(info.shape)
        if (info.dtype not in FLOAT_DTYPES and stored is None) or shape != qm.shape:
            problems.append(
                Finding(
                    "reference.shape",
                    qm.name,
                    f"dense shape {list(qm.shape)} but the reference's {info.name} is"
                    f" {info.dtype}{list(info.shape)}",
                    "the layer holds another tensor than its source's (swapped or resized)",
                )
            )
            continue
        ref.weights[qm.name] = DenseWeight(info, stored)
    if modules and not ref.weights:
        raise InputError(
            f"the reference {ref.folder} matches none of the quantized layers"
            f" ({problems[0].problem if problems else 'no layers'}): is it this model's source?"
        )
    if contract is not None:
        contract.findings.extend(problems)


def _embedding_table(ck: Checkpoint, tensors: dict[str, TensorInfo]) -> TensorInfo | None:
    config = {k: v for k, v in (ck.config or {}).items() if k != "quantization_config"}
    shapes = {n: (t.dtype, t.shape) for n, t in tensors.items()}
    try:
        modules = kinds.classify(shapes, config)
    except kinds.UnsupportedArchitecture:
        return None
    name = heads.embedding_table(modules, config, shapes)
    return tensors[name] if name else None


def compare_dense_tensors(
    ck: Checkpoint, ref: Reference, skip: Callable[[str], bool] | None = None
) -> list[Finding]:
    """Tensors the quantizer copies must equal the reference's byte for byte (a weight the
    reference stores quantized and the output keeps dense: its decoded values, rounded to the
    output's dtype)."""
    found = []
    for name, info in ck.tensors.items():
        r = ref.tensors.get(name)
        if r is None or info.dtype not in FLOAT_DTYPES or (skip and skip(name)):
            continue
        stored = ref.stored.get(name)
        if stored is not None:
            if tuple(info.shape) != stored.shape:
                problem = f"is {list(info.shape)}, the reference's {list(stored.shape)}"
            elif not _same_decoded(info, stored):
                problem = "differs from the reference's decoded weight (it must be its rounding)"
            else:
                continue
        elif r.dtype != info.dtype or r.shape != info.shape:
            problem = f"is {info.dtype}{list(info.shape)}, the reference's {r.dtype}{list(r.shape)}"
        elif not _same_bytes(info, r):
            problem = "differs from the reference's (copied tensors must be identical)"
        else:
            continue
        found.append(
            Finding("reference.dense", name, problem, "the model computes with a wrong tensor")
        )
    return found


def _same_decoded(info: TensorInfo, stored: Stored | Piece, chunk: int = 1 << 22) -> bool:
    import torch

    fds: dict[Path, int] = {}

    def read(t: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        if t.file not in fds:
            fds[t.file] = os.open(t.file, os.O_RDONLY)
        return read_rows(t, fds[t.file], r0, r1)

    dtype = getattr(torch, DTYPES[info.dtype][1])
    rows, cols = stored.shape
    step = rows if stored.whole else max(1, chunk // cols)
    try:
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if not torch.equal(read(info, r0, r1), stored.rows(read, r0, r1).to(dtype)):
                return False
        return True
    finally:
        for fd in fds.values():
            os.close(fd)


def _same_bytes(a: TensorInfo, b: TensorInfo, chunk: int = 16 << 20) -> bool:
    fa, fb = os.open(a.file, os.O_RDONLY), os.open(b.file, os.O_RDONLY)
    try:
        for pos in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - pos)
            if os.pread(fa, n, a.start + pos) != os.pread(fb, n, b.start + pos):
                return False
        return True
    finally:
        os.close(fa)
        os.close(fb)
