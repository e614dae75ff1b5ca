"""Quantized GEMM paths, run the way each compressed-tensors scheme runs in vLLM.

Pure torch, no I/O. Every path takes activations ``x [M, K]`` (any float dtype),
a quantized weight ``q_w [N, K]`` and its per-output-channel scale
``w_scale [N, 1]``, and returns a :class:`GemmRun`: the float32 output ``[M, N]``,
the kernel that computed it and whether that kernel was checked exact.

| scheme        | activations                  | product                         |
| ------------- | ---------------------------- | ------------------------------- |
| W8A8 int8     | int8 per token, dynamic      | int8 x int8 -> int32, rescale   |
| W8A16 int8    | as given (float)             | x @ (q_w * s)^T                 |
| FP8_DYNAMIC   | e4m3 per token, dynamic      | e4m3 x e4m3, float accumulation |
| FP8 (w only)  | as given (float)             | x @ (q_w * s)^T                 |

The output epilogue follows vLLM (CUTLASS ``ScaledEpilogue`` and the CPU oneDNN
path alike): ``out = x_scale * (w_scale * acc)`` in float32.

Large weights are processed in row chunks wherever a float copy of the weight
would be made, so peak extra memory stays near 64 MiB whatever N is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qcli.quant import FP8_MAX, INT8_QMAX, dequantize

__all__ = [
    "FP8_MIN_SCALE",
    "GemmRun",
    "cpu_features",
    "dense",
    "deviation",
    "fp8_dynamic",
    "fp8_weight_only",
    "int8_gemm_may_saturate",
    "quantize_activations_fp8",
    "quantize_activations_int8",
    "saturating_u8s8_deviation",
    "saturating_u8s8_emulation",
    "w8a16",
    "w8a8_int8",
]

# vLLM's floor for a dynamic fp8 activation scale (min_scaling_factor<e4m3>):
# keeps x / scale finite for an all-zero (or denormal) token.
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)

# Bytes of float temporaries one chunk of weight rows may take.
_CHUNK_BYTES = 64 << 20

# Exactness check runs by default up to this many tokens (see ``check`` below).
_AUTO_CHECK_MAX_M = 64


@dataclass
class GemmRun:
    """One quantized GEMM.

    Attributes:
        out: float32 ``[M, N]``.
        kernel: what computed the product, e.g. ``"torch._int_mm"``,
            ``"int32 emulation (float64)"``, ``"torch._scaled_mm"``.
        exact: ``True`` / ``False``: the kernel's result was compared with exact
            arithmetic on the same quantized operands (int8: the int32 accumulator
            bit for bit; fp8: the output, allowing only the float32 rounding of the
            epilogue, see :func:`_close_to_exact`); ``None``: not checked, or a float
            path for which exactness is not a property (weight-only schemes).
        note: why a fallback ran, or what the check found.
        reference, deviation: set when the run was checked (see below).
    """

    out: torch.Tensor
    kernel: str
    exact: bool | None
    note: str = ""
    # With a check: the product in exact arithmetic on the same quantized operands, with
    # the epilogue's float32 roundings done as the kernels do them (what a perfect kernel
    # returns), and how far `out` is from it: max |out - reference| / max |reference|.
    reference: torch.Tensor | None = None
    deviation: float | None = None


def _check_operands(x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor) -> None:
    if x.ndim != 2 or q_w.ndim != 2 or x.shape[1] != q_w.shape[1]:
        raise ValueError(
            f"expected x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(q_w.shape)}"
        )
    if w_scale.numel() != q_w.shape[0]:
        raise ValueError(f"w_scale has {w_scale.numel()} entries for {q_w.shape[0]} rows")


def _chunk_rows(k: int, elem_bytes: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, k * elem_bytes))


def _want_check(check: bool | None, m: int) -> bool:
    return (m <= _AUTO_CHECK_MAX_M) if check is None else check


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], 1)
    return x.float().abs().amax(dim=1, keepdim=True)


# ---------------------------------------------------------------- activations


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8, as vLLM's ``dynamic_scaled_int8_quant``.

    Per row ``m`` of ``x [M, K]``, in float32::

        a = max_k |x[m, k]|
        x_scale = a / 127
        xq = clamp(round_half_even(x * (127 / a)), -128, 127)     (0 where a == 0)

    vLLM multiplies by ``127 / a`` rather than dividing by the scale (its CPU build
    uses ``float(1.0 / double(x_scale))``, which can differ in the last bit); an
    all-zero token gets ``x_scale = 0`` and ``xq = 0``. compressed-tensors' own
    fake-quant divides by ``a / 127.5`` instead; vLLM is what serves the model.

    Returns ``(xq int8 [M, K], x_scale float32 [M, 1])``.
    """
    xf = x.float()
    a = _row_absmax(xf)
    x_scale = a / INT8_QMAX
    inv = torch.where(a == 0, 0.0, INT8_QMAX / a)
    xq = (xf * inv).round_().clamp_(-128, 127).to(torch.int8)
    return xq, x_scale


def quantize_activations_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token e4m3, as vLLM's ``dynamic_per_token_scaled_fp8_quant``.

    Per row, in float32: ``x_scale = max(max_k |x| / 448, 1 / (448 * 512))``,
    ``xq = clamp(x / x_scale, -448, 448).to(float8_e4m3fn)`` (division, not a
    reciprocal: vLLM does this to match FBGEMM).

    Returns ``(xq float8_e4m3fn [M, K], x_scale float32 [M, 1])``.
    """
    xf = x.float()
    x_scale = (_row_absmax(xf) / FP8_MAX).clamp_(min=FP8_MIN_SCALE)
    xq = (xf / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, x_scale


# ---------------------------------------------------------------- exact references


def _exact_matmul_f64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` in float64 for int8 or e4m3 operands, exactly: float64 ``[M, N]``.

    Exact because every product and every partial sum is representable: int8
    products are integers below 2**14, so sums stay below 2**53 for K < 2**39.
    Every e4m3 value is an integer multiple of 2**-9 with a numerator below 2**18,
    so products are multiples of 2**-18 with numerators below 2**36, and sums are
    exact for K < 2**17 (any real layer). The summation order then does not
    matter, so BLAS is fine.
    """
    ad = a.double()
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    step = _chunk_rows(b.shape[1], 8)
    for n0 in range(0, b.shape[0], step):
        out[:, n0 : n0 + step] = ad @ b[n0 : n0 + step].double().t()
    return out


def _epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    # vLLM's order: w_scale * acc first (oneDNN / CUTLASS), then the token scale.
    return (acc.float() * w_scale.float().reshape(1, -1)) * x_scale.float()


def _close_to_exact(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """Whether float32 ``out`` is float64 ``ref`` up to the epilogue's roundings.

    ``acc`` to float32, ``* w_scale``, ``* x_scale``: three roundings of at most
    2**-24 relative each, so ``|out - ref| <= 2**-22 * |ref|`` elementwise for an
    exactly-accumulating kernel. Returns that verdict and the largest deviation
    relative to ``max |ref|``.
    """
    diff = (out.double() - ref).abs()
    ok = bool((diff <= ref.abs() * 2.0**-22).all())
    if diff.numel() == 0:
        return ok, 0.0
    top = float(ref.abs().max())
    return ok, float(diff.max()) / (top if top > 0 else 1.0)


# ---------------------------------------------------------------- schemes


def _int8_acc(xq: torch.Tensor, q_w: torch.Tensor) -> tuple[torch.Tensor, str, str]:
    try:
        return torch._int_mm(xq, q_w.t()), "torch._int_mm", ""
    except (RuntimeError, NotImplementedError) as exc:
        note = f"torch._int_mm unavailable: {str(exc).splitlines()[0]}"
    # Exact integer math (see _exact_matmul_f64), returned as the int32 a
    # wrapping int32 kernel would hold, so overflow past K ~ 133k shows up too.
    acc = _exact_matmul_f64(xq, q_w).to(torch.int64)
    acc = torch.where(acc >= 2**31, acc - 2**32, acc)
    acc = torch.where(acc < -(2**31), acc + 2**32, acc).to(torch.int32)
    return acc, "int32 emulation (float64)", note


def w8a8_int8(
    x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor, check: bool | None = None
) -> GemmRun:
    """W8A8 int8: per-token int8 activations times per-channel int8 weights.

    ``xq, x_scale = quantize_activations_int8(x)``;
    ``acc = xq @ q_w^T`` in int32 (``torch._int_mm``; on this torch's CPU build it
    takes any M, K, N; CUDA's wants M > 16 and K, N multiples of 8, so an error
    falls back to exact emulation); ``out = x_scale * (w_scale * acc)``.

    Args:
        x: ``[M, K]`` float activations.
        q_w: int8 ``[N, K]``; w_scale: ``[N, 1]`` (any float dtype).
        check: compare ``acc`` with exact integer math (float64, chunked).
            ``None``: only when ``M <= 64``, where it is cheap next to the GEMM.
    """
    _check_operands(x, q_w, w_scale)
    if q_w.dtype != torch.int8:
        raise ValueError(f"w8a8_int8 needs an int8 weight, got {q_w.dtype}")
    xq, x_scale = quantize_activations_int8(x)
    acc, kernel, note = _int8_acc(xq, q_w)
    out = _epilogue(acc, x_scale, w_scale)
    if not _want_check(check, x.shape[0]):
        return GemmRun(out, kernel, None, note)
    exact_acc = _exact_matmul_f64(xq, q_w)
    diff = acc.double() - exact_acc
    exact = not bool(diff.any())
    if not exact:
        note = f"{note}; int32 accumulator differs from exact in {int((diff != 0).sum())} "
        note += f"of {diff.numel()} outputs (max |diff| {float(diff.abs().max()):.0f})"
    reference = _epilogue(exact_acc, x_scale, w_scale)
    return GemmRun(out, kernel, exact, note.lstrip("; "), reference, deviation(out, reference))


# Token counts up to which W8A16 runs torch's int8-weight GEMV kernel (faster there than
# dequantizing the weight; slower above: measured 60 vs 330 ms at 1 x 768 x 50257, 275 vs
# 33 ms at 64 x 768 x 3072)
INT8PACK_MAX_TOKENS = 8


def w8a16(
    x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor, check: bool | None = None
) -> GemmRun:
    """W8A16 int8 weight-only: ``out = x_f32 @ (q_w * w_scale)^T``.

    A few tokens run ``torch.ops.aten._weight_int8pack_mm`` in float32 (it applies the
    scale per output after accumulating, same math); its bfloat16 variant is avoided: on
    torch 2.13 CPU it crashes the process for K not a multiple of 16. More tokens run a
    float32 ``F.linear`` on the dequantized weight (chunked over N), as GPU W8A16 kernels
    do: on CPU the int8pack kernel is a GEMV that takes ~M times as long for M tokens
    (8x the dequantized GEMM at 64 tokens). It is the fallback for any M too.
    ``exact`` is ``None``: float accumulation, like every W8A16 kernel; with a check,
    ``reference`` is the float64 product of the dequantized weight.
    """
    _check_operands(x, q_w, w_scale)
    if q_w.dtype != torch.int8:
        raise ValueError(f"w8a16 needs an int8 weight, got {q_w.dtype}")
    xf = x.float().contiguous()
    if xf.shape[0] > INT8PACK_MAX_TOKENS:
        out = _dequant_linear(xf, q_w, w_scale)
        run = GemmRun(out, "dequantized int8 weight, float32 F.linear", None)
        return _with_float_reference(run, xf, q_w, w_scale, check)
    try:
        out = torch.ops.aten._weight_int8pack_mm(
            xf, q_w.contiguous(), w_scale.float().reshape(-1).contiguous()
        )
        run = GemmRun(out, "aten._weight_int8pack_mm (float32)", None)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        note = f"_weight_int8pack_mm unavailable: {str(exc).splitlines()[0]}"
        out = _dequant_linear(xf, q_w, w_scale)
        run = GemmRun(out, "dequantized int8 weight, float32 F.linear", None, note)
    return _with_float_reference(run, xf, q_w, w_scale, check)


def _with_float_reference(
    run: GemmRun, xf: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor, check: bool | None
) -> GemmRun:
    """Weight-only schemes: the float64 product of the dequantized weight, rounded once."""
    if _want_check(check, xf.shape[0]):
        ref = torch.empty(xf.shape[0], q_w.shape[0], dtype=torch.float32)
        step = _chunk_rows(q_w.shape[1], 8)
        s = w_scale.reshape(-1, 1)
        xd = xf.double()
        for n0 in range(0, q_w.shape[0], step):
            w = dequantize(q_w[n0 : n0 + step], s[n0 : n0 + step]).double()
            ref[:, n0 : n0 + step] = (xd @ w.t()).float()
        run.reference, run.deviation = ref, deviation(run.out, ref)
    return run


def fp8_dynamic(
    x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor, check: bool | None = None
) -> GemmRun:
    """FP8_DYNAMIC: per-token e4m3 activations times per-channel e4m3 weights.

    ``xq, x_scale = quantize_activations_fp8(x)``; ``out = x_scale * w_scale *
    (xq @ q_w^T)`` via ``torch._scaled_mm`` with row-wise ``scale_a [M, 1]`` and
    column-wise ``scale_b [1, N]``. On this torch's CPU build it runs for any
    shape, with a large fixed cost, and accumulates in float32: it is *not* exact
    (``exact`` is then ``False`` with the deviation in ``note``; expect ~1e-7 of
    the output's range). Without it: exact emulation (e4m3 products are exact in
    float64, see :func:`_exact_matmul_f64`), ``exact=True``.

    ``check``: compare with the exact result; ``None``: only when ``M <= 64``.
    """
    _check_operands(x, q_w, w_scale)
    if q_w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_dynamic needs a float8_e4m3fn weight, got {q_w.dtype}")
    xq, x_scale = quantize_activations_fp8(x)
    ws = w_scale.float().reshape(1, -1)
    want = _want_check(check, x.shape[0])
    try:
        out = torch._scaled_mm(
            xq,
            q_w.t(),
            scale_a=x_scale.contiguous(),
            scale_b=ws.contiguous(),
            out_dtype=torch.float32,
        )
    except (RuntimeError, NotImplementedError) as exc:
        note = f"torch._scaled_mm unavailable: {str(exc).splitlines()[0]}"
        out = _epilogue(_exact_matmul_f64(xq, q_w), x_scale, ws)
        if not want:
            return GemmRun(out, "fp8 emulation (float64 accumulation)", True, note)
        return GemmRun(out, "fp8 emulation (float64 accumulation)", True, note, out, 0.0)
    if not want:
        return GemmRun(out, "torch._scaled_mm", None)
    acc = _exact_matmul_f64(xq, q_w)
    ok, rel = _close_to_exact(out, acc * ws.double() * x_scale.double())
    reference = _epilogue(acc, x_scale, ws)
    note = f"max |out - exact| / max |exact| = {rel:.2e}"
    return GemmRun(out, "torch._scaled_mm", ok, note, reference, deviation(out, reference))


def fp8_weight_only(
    x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor, check: bool | None = None
) -> GemmRun:
    """FP8 weight-only: ``out = x_f32 @ (q_w * w_scale)^T``, float32, chunked over N.

    vLLM runs this as a weight-dequantizing kernel (Marlin) with float
    accumulation; ``exact`` is ``None`` for the same reason as :func:`w8a16`.
    """
    _check_operands(x, q_w, w_scale)
    if q_w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_weight_only needs a float8_e4m3fn weight, got {q_w.dtype}")
    xf = x.float()
    out = _dequant_linear(xf, q_w, w_scale)
    run = GemmRun(out, "dequantized fp8 weight, float32 F.linear", None)
    return _with_float_reference(run, xf, q_w, w_scale, check)


def deviation(out: torch.Tensor, reference: torch.Tensor) -> float:
    """max |out - reference| / max |reference|; NaN in both places (a NaN scale) is no
    deviation, NaN in one of them is an infinite one."""
    if out.numel() == 0:
        return 0.0
    d = (out.double() - reference.double()).abs()
    dmax = float(d.max())
    if math.isnan(dmax):
        same = torch.isnan(out) & torch.isnan(reference)
        dmax = float(torch.where(same, 0.0, d).nan_to_num(math.inf).max())
    top = float(reference.abs().nan_to_num(0.0).max())
    return dmax / top if top else (0.0 if dmax == 0 else math.inf)


def _dequant_linear(xf: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(xf.shape[0], q_w.shape[0], dtype=torch.float32)
    step = _chunk_rows(q_w.shape[1], 4)
    s = w_scale.reshape(-1, 1)
    for n0 in range(0, q_w.shape[0], step):
        w = dequantize(q_w[n0 : n0 + step], s[n0 : n0 + step])
        out[:, n0 : n0 + step] = F.linear(xf, w)
    return out


def dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float32 reference ``x @ w^T`` (``F.linear``), chunked over the rows of ``w``."""
    xf = x.float()
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    step = _chunk_rows(w.shape[1], 4)
    for n0 in range(0, w.shape[0], step):
        out[:, n0 : n0 + step] = F.linear(xf, w[n0 : n0 + step].float())
    return out


# ---------------------------------------------------------------- CPU int8 kernels


_FEATURE_FLAGS = {
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni",),
    "avx_vnni": ("avx_vnni",),
    "amx": ("amx_int8",),
}


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool]:
    """x86 SIMD features that decide how CPU int8 GEMMs accumulate.

    Keys: ``avx2``, ``avx512f``, ``avx512_vnni``, ``avx_vnni``, ``amx`` (AMX-INT8).
    Read from the first ``flags`` line of ``/proc/cpuinfo``; all ``False`` where
    that file is missing (non-Linux, non-x86).
    """
    flags: set[str] = set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    return {key: any(f in flags for f in names) for key, names in _FEATURE_FLAGS.items()}


def int8_gemm_may_saturate(features: dict[str, bool] | None = None) -> bool:
    """Whether oneDNN-style x86 int8 GEMMs on this CPU can saturate (and so be wrong).

    Without VNNI or AMX, x86 int8 GEMM kernels (oneDNN's, which vLLM's CPU W8A8
    path uses) multiply with ``VPMADDUBSW``: it takes *unsigned* bytes ``u`` times
    signed bytes ``w`` and adds adjacent pairs into a **saturating int16**::

        p = sat16(u[2i] * w[2i] + u[2i+1] * w[2i+1]),   sat16 clamps to [-32768, 32767]

    before ``VPMADDWD`` widens the pairs to int32. Signed activations are made
    unsigned as ``u = x + 128`` (then ``128 * sum_k w[k]`` is subtracted back), so
    ``u`` spans [0, 255] and a pair reaches ``2 * 255 * 127 = 64770``: full-range
    int8 weights overflow int16 whenever two large same-signed products meet, and
    the result is silently clamped. With ``|w| <= 63`` the pair is at most
    ``2 * 255 * 63 = 32130 <= 32767``: exact. ``VPDPBUSD`` (AVX512-VNNI /
    AVX-VNNI) and AMX accumulate four products straight into int32 without that
    intermediate, so they are exact.

    Returns ``True`` when the CPU has AVX2/AVX-512 but neither VNNI nor AMX-INT8.
    """
    f = cpu_features() if features is None else features
    has_simd = f.get("avx2", False) or f.get("avx512f", False)
    has_exact = f.get("avx512_vnni", False) or f.get("avx_vnni", False) or f.get("amx", False)
    return has_simd and not has_exact


def saturating_u8s8_emulation(xq: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    """What a ``VPMADDUBSW`` int8 GEMM computes for ``xq @ q_w^T`` (model).

    ``xq`` int8 ``[M, K]``, ``q_w`` int8 ``[N, K]``; returns int64 ``[M, N]``::

        u = xq + 128                                    (uint8)
        acc = sum_i sat16(u[2i] w[2i] + u[2i+1] w[2i+1]) - 128 * sum_k w[k]

    pairing adjacent K (an odd K is padded with a zero). This is the arithmetic of
    :func:`int8_gemm_may_saturate`; a real kernel's pairing follows its packed
    layout, so treat a difference from exact math as "a VPMADDUBSW kernel would
    be off by about this much here", not as a bit-exact prediction.

    Computed as the exact product plus the clipping of the pairs that can clip: with
    ``u <= 255`` a pair leaves int16 only if ``|w[2i]| + |w[2i+1]| >= 129``, so only those
    weight pairs are evaluated (a few percent of a real layer's), not all ``M * N * K / 2``.
    """
    clipping = _u8s8_clipping(xq, q_w)  # checks the operands first
    return _exact_matmul_f64(xq, q_w).round_().to(torch.int64) + clipping


def saturating_u8s8_deviation(xq: torch.Tensor, q_w: torch.Tensor) -> float:
    """How far :func:`saturating_u8s8_emulation` is from the exact ``xq @ q_w^T``, relative
    to the exact output's range (the exact product computed once)."""
    off = float(_u8s8_clipping(xq, q_w).abs().max())
    top = float(_exact_matmul_f64(xq, q_w).abs().max())
    return off / top if top else 0.0


def _u8s8_clipping(xq: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    """The saturating GEMM minus the exact one, int64 ``[M, N]``: the int16 clipping of the
    pairs that can clip."""
    if xq.dtype != torch.int8 or q_w.dtype != torch.int8:
        raise ValueError("saturating_u8s8_emulation takes int8 operands")
    m, k = xq.shape
    pad = k % 2
    out = torch.zeros(m, q_w.shape[0], dtype=torch.int64)
    u = F.pad(xq.to(torch.int32) + 128, (0, pad))
    wp = F.pad(q_w, (0, pad)).view(q_w.shape[0], -1, 2)
    reach = wp.to(torch.int16).abs_().sum(dim=-1)  # |w0| + |w1| per pair, <= 254
    cand = (reach >= 129).nonzero()  # [C, 2]: (output row, pair)
    step = max(1, (4 << 20) // max(1, m))
    for c0 in range(0, cand.shape[0], step):
        n, j = cand[c0 : c0 + step].unbind(1)
        w0, w1 = wp[n, j, 0].to(torch.int32), wp[n, j, 1].to(torch.int32)
        p = u[:, 2 * j] * w0 + u[:, 2 * j + 1] * w1  # [M, C] int32: the pair sums
        clip = p.clamp(-32768, 32767).sub_(p)
        out.index_add_(1, n, clip.to(torch.int64))
    return out
