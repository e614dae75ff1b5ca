"""Numeric verification: run every quantized layer the way its scheme runs, compare with dense.

For each quantized Linear (qcli.contract.QuantModule) and a seeded batch of activations
(Gaussian with a few outlier channels, several token counts including a 1-token decode), the
layer's output is computed by the scheme's quantized GEMM (qcli.gemm) and compared with the
dense layer: the reference checkpoint's weight when one is given, the dequantized weight
otherwise. The quantized product is also recomputed in exact arithmetic on the same quantized
operands, so a kernel that saturates or misrounds on this CPU is reported as the kernel's fault,
and the verdict on the checkpoint uses the exact product.

Layers stream in blocks of output rows: memory is one block of weight plus the activations,
whatever the layer's size. Every metric is a sum or maximum over rows, so blocks combine exactly.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcli import gemm, kinds, quant
from qcli.contract import ERROR, Contract, Finding, QuantModule
from qcli.errors import InputError, QcliError
from qcli.schemes import Scheme
from qcli.tensors import FLOAT_DTYPES, Checkpoint, TensorInfo, read_rows

REFERENCE, DEQUANTIZED = "reference", "dequantized"
# How the kernel's output compares with exact arithmetic on the same quantized operands.
EXACT, ROUNDING, INEXACT = "exact", "float rounding", "inexact"
TOKENS = (1, 7, 64)  # decode, a short odd prefill, a full batch
FAST_TOKENS = (32,)
FAST_ROWS = 256  # output rows sampled per layer by --fast
OUTLIER_GAIN = 16.0  # outlier channels' scale next to the Gaussian's 1
OUTLIER_EVERY = 128  # one outlier channel per this many input channels (at least one)
BLOCK_ELEMENTS = 4 << 20  # weight elements per streamed block (16 MB as float32)
# Kernel agreement with exact arithmetic on the same quantized operands, as a fraction of the
# output's range: float32 accumulation stays far below this; a saturating int8 kernel is 1e-2.
KERNEL_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Thresholds:
    """What a correct layer clears: SQNR and cosine at least, errors at most."""

    min_sqnr_db: float
    min_cosine: float
    max_rel_err: float  # max |y - ref| / max |ref| over the whole output
    max_channel_err: float  # worst output channel's ||y - ref|| / ||ref||

    def to_json(self) -> dict[str, float]:
        return dict(self.__dict__)


# Per scheme and comparison. Against the reference the error is weight plus activation
# quantization; against the dequantized weight it is activation quantization and the kernel
# alone (weight-only schemes then agree to float rounding, hence their tight bounds).
# Correct layers measured, worst of each set (tiny Llama, tiny Qwen2, all-MiniLM-L6-v2's
# trained weights over seeds 0-3; 1024x4096 Gaussian / Student-t(3) / t(2) weights):
# SQNR >= 19.4 dB (t(2) weights, W8A8; trained weights >= 26 dB), worst channel <= 0.29,
# max rel <= 0.25 (one element, so the noisiest: it only has to catch gross errors).
# Planted corruptions: one scale row x4 gives a channel error of 3.0, a negated row 2.0, a
# zeroed row 1.0; a layer's scales x2 an SQNR of 0 dB; swapped layers -3 dB, cosine 0.04.
# fp8's relative rounding makes its error nearly independent of the weights' tails (29-31 dB
# on every set above), so its SQNR floor sits higher than int8's.
_INT8 = Thresholds(min_sqnr_db=15.0, min_cosine=0.98, max_rel_err=0.5, max_channel_err=0.5)
_FP8 = Thresholds(min_sqnr_db=20.0, min_cosine=0.99, max_rel_err=0.5, max_channel_err=0.5)
_FLOAT_ROUNDING = Thresholds(60.0, 0.99999, 1e-3, 1e-3)
THRESHOLDS: dict[tuple[str, str], Thresholds] = {
    ("W8A8", REFERENCE): _INT8,
    ("W8A8", DEQUANTIZED): _INT8,
    ("W8A16", REFERENCE): _INT8,
    ("W8A16", DEQUANTIZED): _FLOAT_ROUNDING,
    ("FP8_DYNAMIC", REFERENCE): _FP8,
    ("FP8_DYNAMIC", DEQUANTIZED): _FP8,
    ("FP8", REFERENCE): _FP8,
    ("FP8", DEQUANTIZED): _FLOAT_ROUNDING,
}


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
            "kernel_dev": _num(self.kernel_dev),
            "sqnr_db": _num(self.sqnr_db),
            "cosine": _num(self.cosine),
            "max_rel_err": _num(self.max_rel_err),
            "channel_err": _num(self.channel_err),
            "worst_channel": self.worst_channel,
            "saturating_int8_dev": _num(self.saturating_dev),
            "thresholds": self.thresholds.to_json(),
            "ok": self.ok,
            "failures": self.failures,
            "notes": self.notes,
        }


def _num(v: float | None) -> float | str | None:
    """JSON has no inf / nan: write them as strings, keep finite numbers as numbers."""
    if v is None or math.isfinite(v):
        return v
    return str(v)


# --- activations ----------------------------------------------------------------------------


def activations(module: str, in_features: int, tokens: Sequence[int], seed: int = 0) -> list:
    """Seeded activation batches for one layer: float32 ``[t, in]`` for each t in `tokens`.

    Standard Gaussian, with one channel in OUTLIER_EVERY (at least one) scaled by
    OUTLIER_GAIN in every token: per-token activation scales are then set by the outliers,
    as in real LLM activations, which is what makes W8A8 lossy. Seeded by the module's name,
    so a layer gets the same batches whatever --layers selects.
    """
    g = torch.Generator().manual_seed((zlib.crc32(module.encode()) + 1_000_003 * seed) % 2**63)
    n_out = max(1, in_features // OUTLIER_EVERY)
    outliers = torch.randperm(in_features, generator=g)[:n_out]
    batches = []
    for t in tokens:
        x = torch.randn(t, in_features, generator=g)
        x[:, outliers] *= OUTLIER_GAIN
        batches.append(x)
    return batches


# --- the quantized product ------------------------------------------------------------------


def run_kernel(scheme: Scheme, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> gemm.GemmRun:
    """The scheme's quantized GEMM, as the loader runs it (qcli.gemm)."""
    if scheme.name == "W8A8":
        return gemm.w8a8_int8(x, q, s, check=False)
    if scheme.name == "FP8_DYNAMIC":
        return gemm.fp8_dynamic(x, q, s, check=False)
    if scheme.name == "W8A16":
        return gemm.w8a16(x, q, s)
    return gemm.fp8_weight_only(x, q, s)


def exact_product(
    scheme: Scheme,
    x: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    q64: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same product in exact arithmetic (float64 holds every int8 / e4m3 product and sum
    exactly), with the epilogue's float32 roundings done as the kernels do them.

    `q64`: ``q.double()`` when the caller already has it (one conversion per block of rows).
    Weight-only schemes accumulate in float in every kernel: their reference is float64 of
    the dequantized weight, which a correct float32 kernel meets to rounding.
    """
    if scheme.dynamic_activations:
        quantize = (
            gemm.quantize_activations_int8
            if scheme.kind == "int8"
            else gemm.quantize_activations_fp8
        )
        xq, x_scale = quantize(x)
        acc = xq.double() @ (q.double() if q64 is None else q64).t()
        # the kernels' order: w_scale * acc first, then the token scale, in float32
        return (acc.float() * s.float().reshape(1, -1)) * x_scale.float()
    w = quant.dequantize(q, s).double()
    return (x.double() @ w.t()).float()


def saturating_dev(x: torch.Tensor, q: torch.Tensor) -> float:
    """How far a VPMADDUBSW int8 GEMM (x86 without VNNI) would be from exact, relative to the
    output's range, on this layer's weights (qcli.gemm.saturating_u8s8_emulation)."""
    xq, _ = gemm.quantize_activations_int8(x)
    exact = xq.long() @ q.long().t()
    sat = gemm.saturating_u8s8_emulation(xq, q)
    top = float(exact.abs().max())
    return float((sat - exact).abs().max()) / top if top else 0.0


# --- metrics over blocks --------------------------------------------------------------------


class _Stats:
    """Sums and maxima that give qcli.gemm.compare's metrics over row blocks and batches."""

    def __init__(self, rows: int):
        self.sig = self.noise = self.dot = self.ynorm = 0.0
        self.max_abs = self.top = 0.0
        self.nan = False
        self.row_sig = torch.zeros(rows, dtype=torch.float64)
        self.row_noise = torch.zeros(rows, dtype=torch.float64)

    def add(self, y: torch.Tensor, ref: torch.Tensor, r0: int) -> None:
        yd, rd = y.double(), ref.double()
        d = yd - rd
        rs, ns = rd.square().sum(0), d.square().sum(0)
        if not bool(torch.isfinite(ns).all()):  # a NaN or inf anywhere reaches its row's sum
            self.nan = True
            ns = torch.nan_to_num(ns, nan=math.inf)
        self.row_sig[r0 : r0 + y.shape[1]] += rs
        self.row_noise[r0 : r0 + y.shape[1]] += ns
        self.sig += float(rs.sum())
        self.noise += float(ns.sum())
        self.dot += float((yd * rd).sum())
        self.ynorm += float(yd.square().sum())
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.abs().max()))
            self.top = max(self.top, float(rd.abs().max()))

    def metrics(self) -> tuple[float, float, float, float, int]:
        """(sqnr_db, cosine, max_rel_err, worst channel error, worst channel)."""
        if self.nan:
            return math.nan, math.nan, math.nan, math.nan, _first_bad(self.row_noise)
        if self.noise == 0:
            sqnr = math.inf
        elif self.sig == 0:
            sqnr = -math.inf
        else:
            sqnr = 10 * math.log10(self.sig / self.noise)
        ny, nr = math.sqrt(self.ynorm), math.sqrt(self.sig)
        if ny == 0 and nr == 0:
            cosine = 1.0
        elif ny == 0 or nr == 0:
            cosine = 0.0
        else:
            cosine = self.dot / (ny * nr)
        if self.max_abs == 0:
            rel = 0.0
        else:
            rel = self.max_abs / self.top if self.top else math.inf
        # a channel whose reference output is all zero is right only when its output is too
        ratio = torch.where(
            self.row_sig > 0,
            self.row_noise / self.row_sig.clamp(min=1e-300),
            torch.where(self.row_noise > 0, math.inf, 0.0),
        ).sqrt()
        worst = int(ratio.argmax()) if ratio.numel() else 0
        return sqnr, cosine, rel, float(ratio[worst]) if ratio.numel() else 0.0, worst


def _first_bad(noise: torch.Tensor) -> int:
    bad = (~torch.isfinite(noise)).nonzero()
    return int(bad[0, 0]) if bad.numel() else 0


# --- the reference ---------------------------------------------------------------------------


@dataclass
class Reference:
    """A dense checkpoint to compare with, and where each quantized module's weight is in it."""

    checkpoint: Checkpoint
    origin: str  # "--reference" or "qcli_provenance.json"
    weights: dict[str, TensorInfo] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder


def match_reference(
    ref: Reference, modules: Sequence[QuantModule], contract: Contract | None = None
) -> None:
    """Find each module's dense weight in the reference; a module absent or shaped otherwise
    there is a finding about the checkpoint. Raises InputError when nothing matches (the
    reference is another model)."""
    ck = ref.checkpoint
    tensors = ck.tensors
    embedding = _embedding_table(ck)
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
        if info.dtype not in FLOAT_DTYPES or tuple(info.shape) != qm.shape:
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
        ref.weights[qm.name] = info
    if modules and not ref.weights:
        raise InputError(
            f"the reference {ref.folder} matches none of the quantized layers"
            f" ({problems[0].problem if problems else 'no layers'}): is it this model's source?"
        )
    if contract is not None:
        contract.findings.extend(problems)


def _embedding_table(ck: Checkpoint) -> TensorInfo | None:
    config = {k: v for k, v in (ck.config or {}).items() if k != "quantization_config"}
    try:
        modules = kinds.classify({n: (t.dtype, t.shape) for n, t in ck.tensors.items()}, config)
    except kinds.UnsupportedArchitecture:
        return None
    text = config.get("text_config") or config
    vocab = text.get("vocab_size") if isinstance(text, dict) else None
    for m in modules.values():
        if m.kind == kinds.EMBEDDING and m.role == "embedding" and m.weight:
            t = ck.tensors[m.weight]
            if vocab is None or t.shape[0] == vocab:
                return t
    return None


def compare_dense_tensors(
    ck: Checkpoint, ref: Reference, skip: Callable[[str], bool] | None = None
) -> list[Finding]:
    """Tensors the quantizer copies must equal the reference's byte for byte."""
    found = []
    for name, info in ck.tensors.items():
        r = ref.checkpoint.tensors.get(name)
        if r is None or info.dtype not in FLOAT_DTYPES or (skip and skip(name)):
            continue
        if r.dtype != info.dtype or r.shape != info.shape:
            problem = f"is {info.dtype}{list(info.shape)}, the reference's {r.dtype}{list(r.shape)}"
        elif not _same_bytes(info, r):
            problem = "differs from the reference's (copied tensors must be identical)"
        else:
            continue
        found.append(
            Finding("reference.dense", name, problem, "the model computes with a wrong tensor")
        )
    return found


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


# --- one layer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    tokens: tuple[int, ...] = TOKENS
    fast: bool = False
    seed: int = 0
    saturation: bool | None = None  # emulate a VPMADDUBSW int8 kernel; None: on such CPUs
    thresholds: dict[tuple[str, str], Thresholds] | None = None

    def threshold(self, scheme: str, mode: str) -> Thresholds:
        return (self.thresholds or THRESHOLDS)[(scheme, mode)]


class _Files:
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
        """The given rows, one read per contiguous run."""
        parts, i, idx = [], 0, rows.tolist()
        while i < len(idx):
            j = i
            while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
                j += 1
            parts.append(self.rows(info, idx[i], idx[j] + 1))
            i = j + 1
        return torch.cat(parts)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def verify_layer(
    qm: QuantModule, ref_weight: TensorInfo | None, opts: Options, files: _Files
) -> LayerResult:
    """Run one quantized layer on the seeded batches and compare it with the dense layer."""
    scheme = qm.scheme
    out_f, in_f = qm.shape
    mode = REFERENCE if ref_weight is not None else DEQUANTIZED
    tokens = FAST_TOKENS if opts.fast else opts.tokens
    xs = activations(qm.name, in_f, tokens, opts.seed)
    if opts.fast and out_f > FAST_ROWS:
        g = torch.Generator().manual_seed(zlib.crc32(qm.name.encode()) + 7)
        sample = torch.randperm(out_f, generator=g)[:FAST_ROWS].sort().values
        blocks = [(0, FAST_ROWS, sample)]
    else:
        step = max(1, min(out_f, BLOCK_ELEMENTS // max(1, in_f)))
        blocks = [(r0, min(out_f, r0 + step), None) for r0 in range(0, out_f, step)]
    n_rows = blocks[-1][1]
    stats = _Stats(n_rows)
    kernel, dev, inexact = "", 0.0, False
    notes: list[str] = []
    for r0, r1, sample in blocks:
        q, s = _read_quantized(qm, files, r0, r1, sample)
        if ref_weight is None:
            w_ref = quant.dequantize(q, s)
        elif sample is None:
            w_ref = files.rows(ref_weight, r0, r1)
        else:
            w_ref = files.pick(ref_weight, sample)
        q64 = q.double() if scheme.dynamic_activations else None
        for x in xs:
            run = run_kernel(scheme, x, q, s)
            kernel = run.kernel
            if run.note and run.note not in notes:
                notes.append(run.note)
            exact = exact_product(scheme, x, q, s, q64)
            d = _deviation(run.out, exact)
            dev = max(dev, d)
            y = run.out
            if not d <= KERNEL_TOLERANCE:
                inexact = True
                y = exact  # judge the checkpoint, not this CPU's kernel
            stats.add(y, gemm.dense(x, w_ref), r0)
    sat = None
    if scheme.name == "W8A8" and _want_saturation(opts):
        q, _ = _read_quantized(qm, files, *blocks[0])
        # 16 tokens on the first block of rows: the emulation costs M * N * K / 2
        sat = saturating_dev(torch.cat(xs)[:16], q)
        notes.append(
            f"an x86 int8 GEMM without VNNI (vLLM's oneDNN path on such CPUs) would be off by"
            f" {sat:.1%} of the output's range here (saturating int16 pairs); verify used exact"
            " integer math"
        )
    sqnr, cosine, rel, ch_err, worst = stats.metrics()
    if sample is not None:
        worst = int(sample[worst])
    check = EXACT if dev == 0.0 else ROUNDING
    if inexact:
        check = INEXACT
        notes.append(
            f"{kernel} differs from exact arithmetic by {dev:.2e} of the output's range on this"
            " machine: a kernel problem, not the checkpoint's; the metrics use the exact product"
        )
    if ref_weight is not None and ref_weight.name != f"{qm.name}.weight":
        notes.append(f"compared with the reference's {ref_weight.name} (tied source)")
    th = opts.threshold(scheme.name, mode)
    result = LayerResult(
        qm.name,
        scheme.name,
        qm.role,
        qm.shape,
        mode,
        ref_weight.name if ref_weight is not None else None,
        n_rows,
        tuple(tokens),
        kernel,
        check,
        dev,
        sqnr,
        cosine,
        rel,
        ch_err,
        worst,
        th,
        notes=notes,
        saturating_dev=sat,
    )
    result.failures = _failures(result, th)
    return result


def _read_quantized(
    qm: QuantModule, files: _Files, r0: int, r1: int, sample: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if sample is None:
        w, s = files.rows(qm.weight, r0, r1), files.rows(qm.scale, r0, r1)
    else:
        w, s = files.pick(qm.weight, sample), files.pick(qm.scale, sample)
    if qm.scheme.packed:
        w = quant.unpack_int8(w, (w.shape[0], qm.shape[1]))
    return w, s


def _deviation(out: torch.Tensor, exact: torch.Tensor) -> float:
    """max |out - exact| / max |exact|; NaN in both places (a NaN scale) is no deviation."""
    if out.numel() == 0:
        return 0.0
    d = (out.double() - exact.double()).abs()
    dmax = float(d.max())
    if math.isnan(dmax):
        same = torch.isnan(out) & torch.isnan(exact)
        dmax = float(torch.where(same, 0.0, d).nan_to_num(math.inf).max())
    top = float(exact.abs().nan_to_num(0.0).max())
    return dmax / top if top else (0.0 if dmax == 0 else math.inf)


def _want_saturation(opts: Options) -> bool:
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


# --- every layer -----------------------------------------------------------------------------


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
    opts: Options,
    progress: Callable[[LayerResult], None] | None = None,
) -> Iterator[LayerResult]:
    """verify_layer for each module in turn: one layer in memory at a time."""
    files = _Files()
    try:
        for qm in modules:
            ref_weight = None
            if reference is not None:
                ref_weight = reference.weights.get(qm.name)
                if ref_weight is None:
                    continue  # reported by match_reference
            result = verify_layer(qm, ref_weight, opts, files)
            if progress:
                progress(result)
            yield result
    finally:
        files.close()


# --- end to end --------------------------------------------------------------------------------

E2E_MAX_KL = 0.1  # mean KL(reference || quantized) of next-token distributions, nats
E2E_MIN_TOP1 = 0.9  # argmax agreement where the reference is confident
E2E_CONFIDENT_GAP = 1.0  # logit gap (nats) between the reference's top two tokens
E2E_MIN_CONFIDENT = 10  # fewer confident positions than this: top-1 is reported, not judged


def e2e(out: Path, reference: Path, seed: int = 0, tokens: int = 48) -> dict[str, Any]:
    """Load both models with transformers and compare their logits on fixed token ids.

    Top-1 agreement is judged only where the reference is confident (its top logit leads by
    E2E_CONFIDENT_GAP): a random or untrained model's flat logits flip their argmax under any
    noise, which says nothing about the checkpoint.
    """
    try:
        import transformers
    except ImportError:
        raise InputError("--e2e needs transformers (pip install 'qcli[test]')") from None

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def logits(path: Path) -> torch.Tensor:
        # compressed-tensors draws tqdm bars while (de)compressing: keep them off the report
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except Exception as e:  # transformers raises many types; the message is what matters
            raise InputError(
                f"--e2e: transformers cannot load {path}: {str(e).splitlines()[0]}"
            ) from None
        model.eval()
        vocab = model.config.get_text_config().vocab_size
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (2, tokens), generator=g)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return model(ids).logits.float().reshape(-1, vocab)  # decompresses here

    ref, got = logits(reference), logits(out)
    if ref.shape != got.shape:
        raise InputError(f"--e2e: logits of shape {list(got.shape)} vs {list(ref.shape)}")
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    agree = ref.argmax(-1) == got.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) >= E2E_CONFIDENT_GAP
    n_conf = int(confident.sum())
    conf_top1 = float(agree[confident].float().mean()) if n_conf else None
    failures = []
    if not kl <= E2E_MAX_KL:
        failures.append(f"logits KL {kl:.4f} > {E2E_MAX_KL} nats")
    if n_conf >= E2E_MIN_CONFIDENT and not conf_top1 >= E2E_MIN_TOP1:
        failures.append(
            f"top-1 agreement {conf_top1:.1%} < {E2E_MIN_TOP1:.0%} where the reference is"
            f" confident ({n_conf} positions)"
        )
    return {
        "loader": "transformers (compressed-tensors)",
        "positions": int(ref.shape[0]),
        "kl": _num(kl),
        "top1_agreement": float(agree.float().mean()),
        "confident_positions": n_conf,
        "confident_top1_agreement": conf_top1,
        "thresholds": {
            "max_kl": E2E_MAX_KL,
            "min_confident_top1": E2E_MIN_TOP1,
            "confident_gap": E2E_CONFIDENT_GAP,
        },
        "ok": not failures,
        "failures": failures,
    }


# --- the whole run ---------------------------------------------------------------------------

PROVENANCE = "qcli_provenance.json"


@dataclass
class Report:
    """Everything verify found: contract findings, per-layer numbers, end-to-end numbers."""

    checkpoint: Path
    contract: Contract
    reference: Reference | None
    reference_note: str | None  # why no reference was used, when none was
    options: Options
    layers_filter: str | None = None
    layers: list[LayerResult] = field(default_factory=list)
    e2e: dict[str, Any] | None = None
    cpu: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        e2e_ok = self.e2e is None or self.e2e["ok"]
        return self.contract.ok and all(r.ok for r in self.layers) and e2e_ok

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def kernels(self) -> dict[str, dict[str, Any]]:
        """Per scheme: which kernel ran, and how it compared with exact arithmetic."""
        out: dict[str, dict[str, Any]] = {}
        rank = {EXACT: 0, ROUNDING: 1, INEXACT: 2}
        for r in self.layers:
            k = out.setdefault(r.scheme, {"kernels": [], "check": EXACT, "max_dev": 0.0})
            if r.kernel not in k["kernels"]:
                k["kernels"].append(r.kernel)
            if rank[r.kernel_check] > rank[k["check"]]:
                k["check"] = r.kernel_check
            k["max_dev"] = max(k["max_dev"], r.kernel_dev)
        return out

    def to_json(self) -> dict[str, Any]:
        head = [r for r in self.layers if r.role == "lm_head"]
        failed = [r for r in self.layers if not r.ok]
        return {
            "checkpoint": str(self.checkpoint),
            "ok": self.ok,
            "exit_code": self.exit_code,
            "reference": (
                {"path": str(self.reference.folder), "origin": self.reference.origin}
                if self.reference
                else None
            ),
            "reference_note": self.reference_note,
            "compared_with": REFERENCE if self.reference else DEQUANTIZED,
            "options": {
                "fast": self.options.fast,
                "tokens": list(FAST_TOKENS if self.options.fast else self.options.tokens),
                "seed": self.options.seed,
                "layers": self.layers_filter,
            },
            "cpu": self.cpu,
            "kernels": {k: {**v, "max_dev": _num(v["max_dev"])} for k, v in self.kernels().items()},
            "contract": self.contract.to_json(),
            "findings": [f.to_json() for f in self.contract.findings],
            "summary": {
                "layers": len(self.layers),
                "failed_layers": [r.module for r in failed],
                "min_sqnr_db": _num(min((r.sqnr_db for r in self.layers), default=None)),
            },
            "lm_head": head[0].to_json() if head else None,
            "layers": [r.to_json() for r in self.layers],
            "e2e": self.e2e,
        }


def provenance_source(out: Path) -> Path | None:
    """The local source folder that qcli_provenance.json says OUT was quantized from."""
    import json

    try:
        record = json.loads((out / PROVENANCE).read_text(encoding="utf-8"))
        path = Path(record["source"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if (path / "config.json").is_file() else None


def resolve_reference(
    out: Path, spec: str | None, use_provenance: bool, token: str | None = None
) -> tuple[Reference | None, str | None]:
    """The reference to compare with: --reference, else the provenance's source folder."""
    from qcli.tensors import open_checkpoint

    if spec:
        from qcli import source

        folder = source.resolve(spec, None, token).folder
        origin = "--reference"
    elif use_provenance and (found := provenance_source(out)) is not None:
        folder, origin = found, PROVENANCE
    else:
        note = (
            "--no-reference"
            if not use_provenance
            else "no --reference, and no local source recorded in " + PROVENANCE
        )
        return None, note + ": compared with the dequantized weights (kernel and scales only)"
    try:
        if folder.resolve() == out.resolve():
            raise InputError("the reference is the checkpoint itself")
        ck = open_checkpoint(folder)
        if (ck.config or {}).get("quantization_config"):
            raise InputError(f"the reference {folder} is quantized; give the dense source")
    except QcliError as e:
        if origin != PROVENANCE:
            raise
        # a recorded source that moved on is no reason to fail: say so, compare without it
        return None, f"the source in {PROVENANCE} is unusable ({e}): compared with the" + (
            " dequantized weights (kernel and scales only)"
        )
    return Reference(ck, origin), None


def verify_checkpoint(
    out: Path,
    *,
    reference: str | None = None,
    use_provenance: bool = True,
    layers: str | None = None,
    options: Options | None = None,
    run_e2e: bool = False,
    token: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Report:
    """Contract checks, then every selected quantized layer, then (optionally) end to end.

    Raises InputError for input that cannot be verified at all (exit code 2); everything
    wrong with the checkpoint itself is in the Report.
    """
    from qcli import contract as contract_checks

    out = Path(out)
    opts = options or Options()
    ck, found = contract_checks.check_folder(out)
    if ck is not None and not contract_checks.is_quantized(ck):
        raise InputError(f"{out} is not quantized (no quantization_config, no quantized tensors)")
    ref, note = resolve_reference(out, reference, use_provenance, token)
    report = Report(out, found, ref, note, opts, layers)
    report.cpu = {**gemm.cpu_features(), "int8_may_saturate": gemm.int8_gemm_may_saturate()}
    if ck is None:
        return report  # the files themselves are broken: findings say how
    modules = select(found.modules, layers, strict=found.ok)
    if ref is not None and ref.origin == PROVENANCE:
        try:
            match_reference(ref, modules, None)
        except InputError as e:
            report.reference = ref = None
            report.reference_note = (
                f"the source in {PROVENANCE} does not match ({e}): compared with the dequantized"
                " weights (kernel and scales only)"
            )
    if run_e2e and ref is None:
        raise InputError(f"--e2e needs a reference: pass --reference SRC ({report.reference_note})")
    if ref is not None:
        ref.weights.clear()
        match_reference(ref, modules, found)
        skip = {qm.name for qm in found.modules}
        found.findings.extend(
            compare_dense_tensors(ck, ref, lambda n: n.rpartition(".")[0] in skip)
        )
    for i, result in enumerate(run_layers(modules, ref, opts)):
        report.layers.append(result)
        if progress:
            progress(i + 1, len(modules), result.module)
    if run_e2e and ref is not None:
        report.e2e = e2e(out, ref.folder, opts.seed)
    return report


__all__ = [
    "DEQUANTIZED",
    "ERROR",
    "EXACT",
    "INEXACT",
    "ROUNDING",
    "LayerResult",
    "Options",
    "Report",
    "REFERENCE",
    "Reference",
    "THRESHOLDS",
    "Thresholds",
    "activations",
    "compare_dense_tensors",
    "e2e",
    "exact_product",
    "match_reference",
    "provenance_source",
    "resolve_reference",
    "run_kernel",
    "run_layers",
    "saturating_dev",
    "select",
    "verify_checkpoint",
    "verify_layer",
]
