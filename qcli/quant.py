"""Per-output-channel symmetric int8 / fp8 (e4m3fn) quantization primitives.

Pure torch, no I/O. Every function takes and returns tensors; the math is the one
in ``shared/format.md``:

* a weight ``w`` is ``[out, in]`` (any float dtype), its scale ``s`` is ``[out, 1]``
  in the *storage* dtype (float32, bfloat16 or float16);
* ``s = absmax(w[row]) / qmax`` rounded to the storage dtype (and bumped up one
  step when that rounding made it too small, see :func:`compute_scales`);
* int8: ``q = clamp(round_half_even(w_f32 / s_f32), -qmax, qmax)``;
* fp8:  ``q = clamp(w_f32 / s_f32, -448, 448).to(float8_e4m3fn)`` (round to nearest even);
* dequantized weight ``w_hat = q * s``.

Division, not multiplication by a reciprocal, is used everywhere: it is what
compressed-tensors' ``quantize`` does, and the two disagree on a few values that sit
near a rounding tie.

:func:`quantize_weight` is the fast path used on real checkpoints; it is
bit-identical to :func:`compute_scales` + :func:`quantize_int8` / :func:`quantize_fp8`.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

__all__ = [
    "FP8_MAX",
    "INT8_QMAX",
    "QType",
    "NonFiniteWeightError",
    "compute_scales",
    "dequantize",
    "fp8_half_step",
    "max_quant_error",
    "quant_error_ratio",
    "quantize_fp8",
    "quantize_int8",
    "quantize_weight",
    "check_block",
]

INT8_QMAX = 127
FP8_MAX = 448.0

QType = Literal["int8", "fp8"]

_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Adding 1.5 * 2**23 to a float32 |x| < 2**22 leaves a sum whose unit in the last
# place is exactly 1, so the addition itself rounds x to an integer, half to even
# (the IEEE default), and the integer sits in the low mantissa bits:
# bits(_ROUND_MAGIC + k) == _ROUND_MAGIC_BITS + k. A float add and an int subtract
# are each ~3x faster than torch.round on this CPU.
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23
_ROUND_MAGIC_BITS = 0x4B400000


class NonFiniteWeightError(ValueError):
    """A weight to quantize holds NaN or +-Inf.

    ``row`` is the first row holding one, ``col`` the first such column in it and
    ``value`` the value found there (nan, inf or -inf).
    """

    def __init__(self, row: int, col: int, value: float):
        self.row = row
        self.col = col
        self.value = value
        super().__init__(f"weight has a non-finite value ({value}) in row {row}, column {col}")

    @classmethod
    def first_in(cls, w: torch.Tensor, row: int) -> NonFiniteWeightError:
        r = w[row]
        col = int((~torch.isfinite(r)).nonzero()[0, 0])
        return cls(row, col, float(r[col]))


def _default_qmax(qtype: str) -> float:
    if qtype == "int8":
        return float(INT8_QMAX)
    if qtype == "fp8":
        return FP8_MAX
    raise ValueError(f"qtype must be 'int8' or 'fp8', got {qtype!r}")


def _check_qmax(qtype: str, qmax: float | None) -> float:
    q = _default_qmax(qtype) if qmax is None else float(qmax)
    if qtype == "int8" and not (q == int(q) and 1 <= q <= INT8_QMAX):
        # A non-integer or >127 qmax would let round() produce 128, which wraps in int8.
        raise ValueError(f"int8 qmax must be an integer in [1, 127], got {qmax}")
    if qtype == "fp8" and not (0 < q <= FP8_MAX):
        raise ValueError(f"fp8 qmax must be in (0, 448], got {qmax}")
    return q


def _check_weight(w: torch.Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if w.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be float32/bfloat16/float16, got {w.dtype}")


def _row_absmax(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``max_j |w[i, j]|`` as float32 ``[out, 1]``; NaN/Inf propagate.

    amax and amin are two fast reductions with no full-size temporary, unlike
    ``w.abs().amax()`` (a temporary) or ``aminmax`` / ``vector_norm(inf)`` (slow on CPU).
    Exact: the max of float values is one of them, and upcasting to float32 is exact.
    """
    if out is None:
        out = torch.empty(w.shape[0], 1, dtype=torch.float32)
    if w.shape[1] == 0:
        return out.zero_()
    hi = w.amax(dim=1, keepdim=True).float()
    lo = w.amin(dim=1, keepdim=True).float()
    return torch.maximum(hi, lo.neg_(), out=out)


def _first_nonfinite_row(absmax: torch.Tensor) -> int | None:
    bad = ~torch.isfinite(absmax.reshape(-1))
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


def _bumped_scales(
    absmax: torch.Tensor, qmax: float, scale_dtype: torch.dtype, out: torch.Tensor
) -> torch.Tensor:
    """``out = RN_dtype(absmax / qmax)``, one step up where that is too small.

    ``absmax`` is float32 ``[rows, 1]``. The rounded scale ``s`` is moved to
    ``nextup_dtype(s)`` on rows where ``fl32(absmax / s) > qmax``. One step is always
    enough: if ``s < r`` (``r`` the exact ``absmax / qmax``) and ``nextup(s) < r`` too,
    then ``fl32(r) >= nextup(s) > s`` and ``s`` would not have been the nearest value.
    A positive absmax whose scale underflowed to 0 gets the smallest subnormal. Zero
    rows (0 / 0 is NaN, which fails ``<=``) also get the smallest subnormal: callers
    replace it (:func:`_fix_zero_rows`) once they are done dividing by it.
    NaN/Inf absmax gives a NaN/Inf scale; callers check.
    """
    s = (absmax / qmax).to(scale_dtype)
    # fl32 division is monotonic in s, so checking the row maximum checks every element.
    ok = (absmax / s.float()) <= qmax
    up = torch.nextafter(s, torch.tensor(math.inf, dtype=scale_dtype))
    return torch.where(ok, s, up, out=out)


def _fix_zero_rows(scale: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    # eps, not tiny or the smallest subnormal: it is what compressed-tensors'
    # calculate_qparams writes for an all-zero row, so qcli's output matches
    # llm-compressor's there, and no flush-to-zero consumer can turn it into 0.
    return scale.masked_fill_(absmax == 0, torch.finfo(scale.dtype).eps)


def _raise_scale_overflow(scale: torch.Tensor, absmax: torch.Tensor, qmax: float) -> None:
    over = torch.isinf(scale.reshape(-1))
    if bool(over.any()):
        row = int(over.nonzero()[0, 0])
        raise ValueError(
            f"row {row}: scale absmax/qmax = {float(absmax.reshape(-1)[row]) / qmax:.4g} "
            f"overflows {scale.dtype}; store the scale as float32"
        )


def compute_scales(
    w: torch.Tensor,
    qtype: QType,
    scale_dtype: torch.dtype,
    qmax: float | None = None,
) -> torch.Tensor:
    """Per-output-channel symmetric scale, rounded to its storage dtype.

    Math (per row ``i``, ``r_i = max_j |w[i, j]| / qmax`` in float32):
    ``s_i = RN_scale_dtype(r_i)``, bumped to the next representable ``scale_dtype``
    value when that rounding went down far enough that ``fl32(absmax_i / s_i) > qmax``.

    Why the bump: q is computed from the scale *as stored*; a bf16 scale rounded
    down by up to 2**-8 relative would put ``|w / s|`` above qmax, and the clamp in
    ``quantize_*`` would then add its own error on top of rounding. With the bump
    ``|fl32(w / s)| <= qmax`` for every element, the clamp never moves a value, and
    the error is pure rounding: at most ``s / 2`` for int8, half an e4m3 step for fp8
    (see :func:`max_quant_error`). It also keeps int8 values in ``[-qmax, qmax]``
    without relying on the clamp.

    A row of zeros gets ``torch.finfo(scale_dtype).eps`` (what compressed-tensors
    writes, positive and finite, so dequantization gives 0, not NaN). A nonzero row
    whose scale underflows is bumped to the smallest subnormal, which still bounds
    ``|w / s|`` by qmax.

    Args:
        w: ``[out, in]`` float32 / bfloat16 / float16.
        qtype: ``"int8"`` (qmax default 127) or ``"fp8"`` (default 448).
        scale_dtype: float32, bfloat16 or float16.
        qmax: largest quantized magnitude to use (e.g. 63 to keep int8 weights
            within +-63); integer in [1, 127] for int8, (0, 448] for fp8.

    Returns:
        ``[out, 1]`` tensor of dtype ``scale_dtype``, every entry positive and finite.

    Raises:
        NonFiniteWeightError: ``w`` holds NaN/Inf (``.row`` is the first bad row).
        ValueError: bad arguments, or a scale overflows ``scale_dtype``.
    """
    _check_weight(w)
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be float32/bfloat16/float16, got {scale_dtype}")
    q = _check_qmax(qtype, qmax)
    absmax = _row_absmax(w)
    bad = _first_nonfinite_row(absmax)
    if bad is not None:
        raise NonFiniteWeightError.first_in(w, bad)
    scale = torch.empty(absmax.shape, dtype=scale_dtype)
    _fix_zero_rows(_bumped_scales(absmax, q, scale_dtype, out=scale), absmax)
    _raise_scale_overflow(scale, absmax, q)
    return scale


def quantize_int8(w: torch.Tensor, scale: torch.Tensor, qmax: int = INT8_QMAX) -> torch.Tensor:
    """``q = clamp(round_half_even(w_f32 / scale_f32), -qmax, qmax)`` as int8 ``[out, in]``.

    Reference implementation (full-size float32 temporaries); ``scale`` is
    ``[out, 1]`` (or anything broadcastable) in any float dtype.
    """
    x = w.float() / scale.float()
    return x.round_().clamp_(-qmax, qmax).to(torch.int8)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q = clamp(w_f32 / scale_f32, -448, 448).to(float8_e4m3fn)`` ``[out, in]``.

    The cast rounds to nearest, ties to even. Reference implementation.
    """
    x = w.float() / scale.float()
    return x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_weight(
    w: torch.Tensor,
    qtype: QType,
    scale_dtype: torch.dtype,
    qmax: float | None = None,
    block_rows: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and quantize a whole weight, fast: ``(q, scale)``. (Long for its docstring,
    which states the math the fast path must keep.)

    Same result, bit for bit, as ``s = compute_scales(w, qtype, scale_dtype, qmax)``
    followed by ``quantize_int8(w, s, qmax)`` / ``quantize_fp8(w, s)``.

    Works through ``block_rows`` rows at a time in one preallocated float32 buffer
    (``block_rows * in * 4`` bytes, sized to stay in L2) with in-place ops, writing
    into a preallocated output: no full-size float32 temporary, peak extra memory
    is the buffer plus the outputs. Per block:

    1. upcast the rows into the buffer; absmax per row (amax, amin); scale;
    2. ``buf /= s``;
    3. int8: ``buf += 1.5 * 2**23`` (rounds half-even to an integer, exactly, since
       ``|buf| <= qmax`` by construction of ``s``), the integer is then the float's
       bit pattern minus a constant, narrowed to int8; fp8: cast the buffer.

    No clamp is needed: :func:`compute_scales` guarantees ``|fl32(w / s)| <= qmax``.
    torch ops release the GIL, so independent weights can be quantized in threads.

    Args:
        w: ``[out, in]`` float32 / bfloat16 / float16 (any strides).
        qtype: ``"int8"`` or ``"fp8"``.
        scale_dtype: storage dtype of the scale (float32 / bfloat16 / float16).
        qmax: as in :func:`compute_scales`.
        block_rows: rows per block (tuning knob; results do not depend on it).

    Returns:
        ``q``: int8 or float8_e4m3fn ``[out, in]``; ``scale``: ``[out, 1]`` scale_dtype.

    Raises:
        NonFiniteWeightError: NaN/Inf in ``w``; ``.row`` is the first bad row.
        ValueError: bad arguments or a scale overflowing ``scale_dtype``.
    """
    _check_weight(w)
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be float32/bfloat16/float16, got {scale_dtype}")
    qm = _check_qmax(qtype, qmax)
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    rows, cols = w.shape
    out_dtype = torch.int8 if qtype == "int8" else torch.float8_e4m3fn
    q = torch.empty(rows, cols, dtype=out_dtype)
    scale = torch.empty(rows, 1, dtype=scale_dtype)
    absmax_all = torch.empty(rows, 1, dtype=torch.float32)
    if rows == 0:
        return q, scale
    n_buf = min(block_rows, rows)
    buf = torch.empty(n_buf, cols, dtype=torch.float32)
    ibuf = buf.view(torch.int32)
    for r0 in range(0, rows, n_buf):
        r1 = min(r0 + n_buf, rows)
        b = buf[: r1 - r0]
        b.copy_(w[r0:r1])
        absmax = _row_absmax(b, out=absmax_all[r0:r1])
        # NaN rows give a NaN scale and garbage q; we raise after the loop, once,
        # rather than syncing on a check for every block.
        s = _bumped_scales(absmax, qm, scale_dtype, out=scale[r0:r1])
        b.div_(s.float())
        if qtype == "int8":
            b.add_(_ROUND_MAGIC)
            ib = ibuf[: r1 - r0]
            ib.sub_(_ROUND_MAGIC_BITS)
            q[r0:r1].copy_(ib)
        else:
            q[r0:r1].copy_(b)
    bad = _first_nonfinite_row(absmax_all)
    if bad is not None:
        raise NonFiniteWeightError.first_in(w, bad)
    _raise_scale_overflow(scale, absmax_all, qm)
    # Zero rows were divided by the smallest subnormal (q = 0 either way).
    _fix_zero_rows(scale, absmax_all)
    return q, scale


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``w_hat = q_f32 * scale_f32``, cast to ``dtype``.

    ``q``: int8 or float8_e4m3fn ``[out, in]``; ``scale``: ``[out, 1]`` any float dtype.
    With a bf16/fp16 scale the float32 product is exact (<= 16 significant bits), so
    the result equals compressed-tensors' ``dequantize`` (which multiplies in the
    scale's dtype) rounded once to ``dtype``.
    """
    return (q.float() * scale.float()).to(dtype)


def fp8_half_step(v: torch.Tensor) -> torch.Tensor:
    """Half the e4m3fn grid spacing at magnitude ``|v|``, float32, same shape.

    e4m3fn has 3 mantissa bits, exponent bias 7, normals from ``2**-6``: the spacing
    in ``[2**e, 2**(e+1))`` is ``2**(e-3)`` for ``e >= -6``; below ``2**-6``
    (subnormals and 0) it is ``2**-9``. For ``v`` in ``[2**e, 2**(e+1))`` the spacing
    *above* the value is returned, which is the larger of the two neighbouring gaps.
    """
    a = v.float().abs()
    _, e = torch.frexp(a)  # |v| = m * 2**e with m in [0.5, 1); frexp(0) gives e = 0
    e = torch.where(a < 2.0**-6, -5, e.clamp_(max=9))
    # 2**(e - 5) built from its bit pattern: exact, unlike exp2/pow on some builds.
    return ((e + (127 - 5)).to(torch.int32) << 23).view(torch.float32)


def _unit_roundoff(dtype: torch.dtype) -> float:
    # Relative error of one round-to-nearest into dtype: 2**-p, p = mantissa bits + 1.
    return torch.finfo(dtype).eps / 2


def max_quant_error(
    q: torch.Tensor,
    scale: torch.Tensor,
    qtype: QType,
    dequant_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-element bound on ``|w - w_hat|`` for a weight quantized by this module.

    ``w`` is the original weight, ``w_hat = dequantize(q, scale, dequant_dtype)``
    (or any decompressor that rounds ``q * s`` once into ``dequant_dtype``).
    Float64, broadcastable to ``q`` (``[out, 1]`` for int8, ``[out, in]`` for fp8)::

        bound = s * h(q)                      rounding to the quantized grid
              + s * (|q| + h(q)) * 2**-24     the float32 division w / s
              + |q * s| * u(dequant_dtype)    rounding q * s into dequant_dtype
              + smallest_subnormal(dequant_dtype)

    with ``h = 1/2`` for int8 and ``h = fp8_half_step(q)`` for fp8 (half an e4m3
    step, per format.md; taken at ``|q|``, the larger neighbouring gap, since the
    original value is not at hand). The second and third terms are what float
    arithmetic adds; they are ~1e-7 relative for float32 but ``2**-8`` relative for
    a bfloat16 ``w_hat``. The bound assumes the scale came from
    :func:`compute_scales` (no clamping); a clamped value exceeds it, as it should.
    """
    s = scale.double()
    qd = q.double()
    if qtype == "int8":
        h = torch.full_like(s, 0.5)
        qabs = qd.abs().amax(dim=1, keepdim=True)
    elif qtype == "fp8":
        h = fp8_half_step(q).double()
        qabs = qd.abs()
    else:
        raise ValueError(f"qtype must be 'int8' or 'fp8', got {qtype!r}")
    fin = torch.finfo(dequant_dtype)
    return (
        s * h
        + s * (qabs + h) * 2.0**-24
        + qabs * s * _unit_roundoff(dequant_dtype)
        + fin.tiny * fin.eps
    )


def quant_error_ratio(
    w: torch.Tensor,
    w_hat: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    qtype: QType,
) -> torch.Tensor:
    """Per-row ``max_j |w - w_hat| / max_quant_error``, float64 ``[out]``.

    A row is within the contract iff its ratio is ``<= 1``; NaN in ``w_hat`` gives
    NaN (which fails ``<= 1``). ``w_hat``'s dtype is taken as the dequant dtype.
    Uses float64 temporaries the size of ``w``: callers with large weights pass
    row blocks.
    """
    err = (w.double() - w_hat.double()).abs()
    bound = max_quant_error(q, scale, qtype, w_hat.dtype)
    return (err / bound).amax(dim=1)


CHECK_BUFFER_BYTES = 1 << 20  # check_block's float32 rows at a time (about L2: fewer ops)


@functools.cache
def _fp8_values() -> torch.Tensor:
    """Every e4m3fn code's float32 value, by torch's own conversion."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def check_block(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, qtype: QType) -> int | None:
    """The first row of a just-quantized block whose values miss their error bound, or None.

    Run on every block before it is written (a bug must never reach a checkpoint), so it
    is cheap: float32, one reusable buffer, per element::

        |q * s - w| <= s * (h(q) + 2**-22 * (|q| + 1))

    with ``h = 1/2`` for int8 and, for fp8, ``h = max(|q| / 16, 2**-10)``: half an e4m3
    step is at most 1/16 of the value in the normal range (3 mantissa bits) and 2**-10 among
    the subnormals. The 2**-22 term covers float32's own roundings (the division that made
    ``q``, the product ``q * s`` and the difference, each within 2**-24 relative). An int8
    value off by one step, a wrapped value, a wrong scale or a row mixed up with another
    misses it; the exact bound is :func:`max_quant_error`, which tests use.
    """
    rows, cols = q.shape
    if rows == 0 or cols == 0:
        return None
    s = scale.float().reshape(rows, 1)
    bad = ~(torch.isfinite(s) & (s > 0)).reshape(-1)
    if bool(bad.any()):
        return int(bad.nonzero()[0, 0])
    # A few rows at a time in float32 buffers that stay in L2 (a whole block's temporaries
    # would stream through memory several times), with as few passes as the bound allows:
    # int8 takes |q| <= 128 in the rounding term, fp8 max(a, b) <= a + b; both a hair looser
    # than the formula above, and still far inside one step.
    step = max(1, CHECK_BUFFER_BYTES // (cols * 4))
    n = min(step, rows)
    buf = torch.empty(n, cols, dtype=torch.float32)
    mag = torch.empty(n, cols, dtype=torch.float32) if qtype != "int8" else None
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        d, ss = buf[: r1 - r0], s[r0:r1]
        if q.dtype == torch.float8_e4m3fn:  # a table of the 256 codes: 3x torch's own cast
            codes = q[r0:r1].reshape(-1).view(torch.uint8).int()
            torch.index_select(_fp8_values(), 0, codes, out=d.view(-1))
        else:
            d.copy_(q[r0:r1])
        if qtype == "int8":
            d.mul_(ss).sub_(w[r0:r1]).abs_()  # |q * s - w|
            limit = ss * (0.5 + 2.0**-22 * 129)
            miss = ~(d.amax(dim=1, keepdim=True) <= limit).reshape(-1)
        else:
            a = mag[: r1 - r0]
            torch.abs(d, out=a)  # |q|
            d.mul_(ss).sub_(w[r0:r1]).abs_()  # |q * s - w|
            # |q * s - w| - s |q| (1/16 + 2**-22) <= s (2**-10 + 2**-22), per element
            d.addcmul_(a, ss, value=-(1 / 16 + 2.0**-22))
            miss = ~(d.amax(dim=1, keepdim=True) <= ss * (2.0**-10 + 2.0**-22)).reshape(-1)
        if bool(miss.any()):
            return r0 + int(miss.nonzero()[0, 0])
    return None
