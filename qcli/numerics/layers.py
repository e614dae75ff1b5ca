"""One quantized layer, run the way its scheme runs, against the dense layer.

For each quantized Linear (qcli.checks.QuantModule) and a seeded batch of activations, the
layer's output is computed by the scheme's quantized GEMM (qcli.gemm) and compared with the
dense layer: the reference checkpoint's weight when one is given, the dequantized weight
otherwise. gemm also returns the product in exact arithmetic on the same quantized operands,
so a kernel that saturates or misrounds on this CPU is reported as the kernel's fault, and
the verdict on the checkpoint then uses the exact product.

Layers stream in blocks of output rows: memory is one block of weight plus the activations,
whatever the layer's size (qcli.numerics.metrics combines blocks exactly).
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcli import gemm, quant
from qcli.checks import QuantModule
from qcli.errors import InputError
from qcli.jsondata import number
from qcli.numerics.activations import FAST_TOKENS, TOKENS, activations
from qcli.numerics.metrics import Stats
from qcli.numerics.reference import DenseWeight, Reference
from qcli.numerics.thresholds import (
    DEQUANTIZED,
    KERNEL_TOLERANCE,
    REFERENCE,
    THRESHOLDS,
    Thresholds,
)
from qcli.schemes import Scheme
from qcli.tensors import TensorInfo, read_rows

# How the kernel's output compares with exact arithmetic on the same quantized operands.
EXACT, ROUNDING, INEXACT = "exact", "float rounding", "inexact"
FAST_ROWS = 256  # output rows sampled per layer by --fast
BLOCK_ELEMENTS = 4 << 20  # weight elements per streamed block (16 MB as float32)


@dataclass(frozen=True)
class VerifyOptions:
    tokens: tuple[int, ...] = TOKENS
    fast: bool = False
    seed: int = 0
    saturation: bool | None = None  # emulate a VPMADDUBSW int8 kernel; None: on such CPUs
    thresholds: dict[tuple[str, str], Thresholds] | None = None

    def threshold(self, scheme: str, mode: str) -> Thresholds:
        return (self.thresholds or THRESHOLDS)[(scheme, mode)]


@dataclass
class LayerResult:
    """One layer's numbers, and which of its thresholds it missed."""

    module: str
    scheme: str
    role: str | None
    shape: tuple[int, int]
    compared_with: str  # REFERENCE or DEQUANTIZED
    reference_tensor: str | None
    rows: int  # output rows checked (all, or a sample with --fast)
    tokens: tuple[int, ...]
    kernel: str
    kernel_check: str  # EXACT, ROUNDING (float accumulation) or INEXACT, against exact math
    kernel_dev: float  # max |kernel - exact| / max |exact| on the same quantized operands
    sqnr_db: float
    cosine: float
    max_rel_err: float
    channel_err: float
    worst_channel: int
    thresholds: Thresholds
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    saturating_dev: float | None = None  # what a VPMADDUBSW int8 kernel would be off by

    @property
    def ok(self) -> bool:
        return not self.failures

    def margin(self) -> float:
        """How far inside its thresholds the layer sits, in dB of SQNR (negative: failed)."""
        return self.sqnr_db - self.thresholds.min_sqnr_db if not math.isnan(self.sqnr_db) else -1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "scheme": self.scheme,
            "role": self.role,
            "shape": list(self.shape),
            "compared_with": self.compared_with,
            "reference_tensor": self.reference_tensor,
            "rows_checked": self.rows,
            "tokens": list(self.tokens),
            "kernel": self.kernel,
            "kernel_check": self.kernel_check,
            "kernel_dev": number(self.kernel_dev),
            "sqnr_db": number(self.sqnr_db),
            "cosine": number(self.cosine),
            "max_rel_err": number(self.max_rel_err),
            "channel_err": number(self.channel_err),
            "worst_channel": self.worst_channel,
            "saturating_int8_dev": number(self.saturating_dev),
            "thresholds": self.thresholds.to_json(),
            "ok": self.ok,
            "failures": self.failures,
            "notes": self.notes,
        }


class Files:
    """Open file descriptors, shared by every read of one run."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def fd(self, info: TensorInfo) -> int:
        if info.file not in self.fds:
            self.fds[info.file] = os.open(info.file, os.O_RDONLY)
        return self.fds[info.file]

    def rows(self, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        return read_rows(info, self.fd(info), r0, r1)

    def pick(self, info: TensorInfo, rows: torch.Tensor) -> torch.Tensor:
        return self.pick_with(lambda a, b: self.rows(info, a, b), rows)

    @staticmethod
    def pick_with(read: Callable[[int, int], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """The given rows, one read per contiguous run."""
        parts, i, idx = [], 0, rows.tolist()
        while i < len(idx):
            j = i
            while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
                j += 1
            parts.append(read(idx[i], idx[j] + 1))
            i = j + 1
        return torch.cat(parts)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def run_kernel(scheme: Scheme, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> gemm.GemmRun:
    """The scheme's quantized GEMM, as the loader runs it (qcli.gemm), checked against exact
    arithmetic on the same operands."""
    kernels = {
        "W8A8": gemm.w8a8_int8,
        "FP8_DYNAMIC": gemm.fp8_dynamic,
        "W8A16": gemm.w8a16,
        "FP8": gemm.fp8_weight_only,
    }
    return kernels[scheme.name](x, q, s, check=True)


def saturating_dev(x: torch.Tensor, q: torch.Tensor) -> float:
    """How far a VPMADDUBSW int8 GEMM (x86 without VNNI) would be from exact, relative to the
    output's range, on this layer's weights (qcli.gemm.saturating_u8s8_emulation)."""
    xq, _ = gemm.quantize_activations_int8(x)
    return gemm.saturating_u8s8_deviation(xq, q)


@dataclass
class _KernelLog:
    """What the kernel did on every batch of one layer."""

    kernel: str = ""
    dev: float = 0.0
    inexact: bool = False
    notes: list[str] = field(default_factory=list)

    def judged(self, run: gemm.GemmRun) -> torch.Tensor:
        """The output the checkpoint is judged on: the kernel's, unless the kernel is off."""
        self.kernel = run.kernel
        if run.note and run.note not in self.notes:
            self.notes.append(run.note)
        assert run.reference is not None and run.deviation is not None
        self.dev = max(self.dev, run.deviation)
        if not run.deviation <= KERNEL_TOLERANCE:
            self.inexact = True
            return run.reference  # judge the checkpoint, not this CPU's kernel
        return run.out


def verify_layer(
    qm: QuantModule, ref_weight: DenseWeight | None, opts: VerifyOptions, files: Files
) -> LayerResult:
    """Run one quantized layer on the seeded batches and compare it with the dense layer."""
    out_f, in_f = qm.shape
    mode = REFERENCE if ref_weight is not None else DEQUANTIZED
    tokens = FAST_TOKENS if opts.fast else opts.tokens
    xs = activations(qm.name, in_f, tokens, opts.seed)
    blocks = _blocks(qm, opts.fast)
    stats = Stats(blocks[-1][1])
    log = _KernelLog()
    for r0, r1, sample in blocks:
        q, s = _read_quantized(qm, files, r0, r1, sample)
        if ref_weight is None:
            w_ref = quant.dequantize(q, s)
        elif sample is None:
            w_ref = ref_weight.rows(files.rows, r0, r1)
        else:
            w_ref = files.pick_with(lambda a, b: ref_weight.rows(files.rows, a, b), sample)
        for x in xs:
            stats.add(log.judged(run_kernel(qm.scheme, x, q, s)), gemm.dense(x, w_ref), r0)
    notes = list(log.notes)
    sat = None
    if qm.scheme.name == "W8A8" and _want_saturation(opts):
        q, _ = _read_quantized(qm, files, *blocks[0])
        # 16 tokens on the first block of rows: the emulation costs M * N * K / 2
        sat = saturating_dev(torch.cat(xs)[:16], q)
    notes += _notes(qm, ref_weight, log, sat)
    m = stats.metrics()
    sample = blocks[0][2]
    worst = int(sample[m.worst_channel]) if sample is not None else m.worst_channel
    check = INEXACT if log.inexact else (EXACT if log.dev == 0.0 else ROUNDING)
    th = opts.threshold(qm.scheme.name, mode)
    result = LayerResult(
        qm.name,
        qm.scheme.name,
        qm.role,
        qm.shape,
        mode,
        ref_weight.name if ref_weight is not None else None,
        blocks[-1][1],
        tuple(tokens),
        log.kernel,
        check,
        log.dev,
        m.sqnr_db,
        m.cosine,
        m.max_rel_err,
        m.channel_err,
        worst,
        th,
        notes=notes,
        saturating_dev=sat,
    )
    result.failures = _failures(result, th)
    return result


def _notes(
    qm: QuantModule, ref_weight: DenseWeight | None, log: _KernelLog, sat: float | None
) -> list[str]:
    notes = []
    if sat is not None:
        notes.append(
            f"an x86 int8 GEMM without VNNI (vLLM's oneDNN path on such CPUs) would be off by"
            f" {sat:.1%} of the output's range here (saturating int16 pairs); verify used exact"
            " integer math"
        )
    if log.inexact:
        notes.append(
            f"{log.kernel} differs from exact arithmetic by {log.dev:.2e} of the output's range"
            " on this machine: a kernel problem, not the checkpoint's; the metrics use the exact"
            " product"
        )
    if ref_weight is not None and ref_weight.name != f"{qm.name}.weight":
        notes.append(f"compared with the reference's {ref_weight.name} (tied source)")
    if ref_weight is not None and ref_weight.stored is not None:
        notes.append(f"compared with the reference's {ref_weight.stored.family} weight, decoded")
    return notes


def _blocks(qm: QuantModule, fast: bool) -> list[tuple[int, int, torch.Tensor | None]]:
    """Row blocks (r0, r1, sampled rows or None) that cover the layer (or --fast's sample)."""
    out_f, in_f = qm.shape
    if fast and out_f > FAST_ROWS:
        g = torch.Generator().manual_seed(zlib.crc32(qm.name.encode()) + 7)
        sample = torch.randperm(out_f, generator=g)[:FAST_ROWS].sort().values
        return [(0, FAST_ROWS, sample)]
    step = max(1, min(out_f, BLOCK_ELEMENTS // max(1, in_f)))
    return [(r0, min(out_f, r0 + step), None) for r0 in range(0, out_f, step)]


def _read_quantized(
    qm: QuantModule, files: Files, r0: int, r1: int, sample: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if sample is None:
        w, s = files.rows(qm.weight, r0, r1), files.rows(qm.scale, r0, r1)
    else:
        w, s = files.pick(qm.weight, sample), files.pick(qm.scale, sample)
    return qm.layout.decode(w, qm.shape[1]), s


def _want_saturation(opts: VerifyOptions) -> bool:
    return gemm.int8_gemm_may_saturate() if opts.saturation is None else opts.saturation


def _failures(r: LayerResult, th: Thresholds) -> list[str]:
    out = []
    if math.isnan(r.sqnr_db):
        return [f"output has NaN/inf (first bad channel {r.worst_channel})"]
    if not r.sqnr_db >= th.min_sqnr_db:
        out.append(f"SQNR {r.sqnr_db:.1f} dB < {th.min_sqnr_db:g} dB")
    if not r.cosine >= th.min_cosine:
        out.append(f"cosine {r.cosine:.4f} < {th.min_cosine:g}")
    if not r.max_rel_err <= th.max_rel_err:
        out.append(f"max relative error {r.max_rel_err:.3g} > {th.max_rel_err:g}")
    if not r.channel_err <= th.max_channel_err:
        out.append(
            f"output channel {r.worst_channel}: relative error {r.channel_err:.3g}"
            f" > {th.max_channel_err:g}"
        )
    return out


def select(
    modules: Sequence[QuantModule], layers: str | None, strict: bool = True
) -> list[QuantModule]:
    """The modules whose name matches the --layers regex (re.search), all without one.

    `strict`: a regex that matches nothing is an input error. Not when the contract failed:
    the layer asked for may be one whose tensors are broken, which the findings report.
    """
    if not layers:
        return list(modules)
    try:
        rx = re.compile(layers)
    except re.error as e:
        raise InputError(f"--layers: invalid regular expression {layers!r}: {e}") from None
    picked = [m for m in modules if rx.search(m.name)]
    if not picked and strict:
        raise InputError(f"--layers {layers!r} matches no quantized layer")
    return picked


def run_layers(
    modules: Sequence[QuantModule],
    reference: Reference | None,
    opts: VerifyOptions,
    progress: Callable[[LayerResult], None] | None = None,
) -> Iterator[LayerResult]:
    """verify_layer for each module in turn: one layer in memory at a time."""
    files = Files()
    try:
        for qm in modules:
            ref_weight = None
            if reference is not None:
                ref_weight = reference.weights.get(qm.name)
                if ref_weight is None:
                    continue  # reported by reference.match
            result = verify_layer(qm, ref_weight, opts, files)
            if progress:
                progress(result)
            yield result
    finally:
        files.close()
