"""qcli.quant against its own reference math and against compressed-tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcli.layout import _pack_bytes_arith, _unpack_bytes_arith, pack_int8, unpack_int8
from qcli.quant import (
    FP8_MAX,
    INT8_QMAX,
    NonFiniteWeightError,
    check_block,
    compute_scales,
    dequantize,
    fp8_half_step,
    max_quant_error,
    quant_error_ratio,
    quantize_fp8,
    quantize_int8,
    quantize_weight,
)

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import (  # noqa: E402
    dequantize as ct_dequantize,
)
from compressed_tensors.quantization.lifecycle.forward import (  # noqa: E402
    quantize as ct_quantize,
)

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("int8", "fp8")


def _reference(w: torch.Tensor, kind: str, scale_dtype: torch.dtype, qmax=None):
    s = compute_scales(w, kind, scale_dtype, qmax)
    if kind == "int8":
        return quantize_int8(w, s, INT8_QMAX if qmax is None else int(qmax)), s
    return quantize_fp8(w, s), s


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # fp8 tensors are compared as bytes: NaN != NaN and -0 == 0 would hide differences.
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _weights(dtype: torch.dtype, rows: int = 96, cols: int = 80, seed: int = 0) -> torch.Tensor:
    """Random rows spanning 6 decades, plus a zero row and a one-hot row."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-3, 3 if dtype != torch.float16 else 2, rows)[:, None]
    w = torch.randn(rows, cols, generator=g) * mags
    w[5] = 0
    w[6] = 0
    w[6, 3] = -2.5
    return w.to(dtype)


def _ties(kind: str) -> torch.Tensor:
    """Rows whose scale is a power of two, so that w / s lands exactly on rounding ties.

    int8: w / s = k + 0.5 for all k; fp8: w / s = midpoints of adjacent e4m3 values.
    Each row also holds +-qmax so its absmax (and scale) is the intended one.
    """
    if kind == "int8":
        mids = torch.arange(-127, 127, dtype=torch.float64) + 0.5
        qmax = 127.0
    else:
        grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        grid = grid.double()
        grid = grid[torch.isfinite(grid)].unique().sort().values
        mids = (grid[1:] + grid[:-1]) / 2
        qmax = FP8_MAX
    rows = []
    for e in (-6, 0, 3):
        row = torch.cat([mids, torch.tensor([qmax, -qmax], dtype=torch.float64)])
        rows.append(row * 2.0**e)
    return torch.stack(rows)


# ---------------------------------------------------------------- compute_scales


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("w_dtype,s_dtype", itertools.product(FLOATS, FLOATS))
def test_scales_bound_every_element(kind, w_dtype, s_dtype):
    w = _weights(w_dtype)
    s = compute_scales(w, kind, s_dtype)
    qmax = INT8_QMAX if kind == "int8" else FP8_MAX
    assert s.shape == (w.shape[0], 1) and s.dtype == s_dtype
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    assert float((w.float() / s.float()).abs().max()) <= qmax


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("s_dtype", FLOATS)
def test_scale_is_rounded_then_bumped_at_most_one_step(kind, s_dtype):
    w = _weights(torch.float32, rows=400)
    w[5:7] = 1.0  # keep the zero-row special case out of this check
    qmax = INT8_QMAX if kind == "int8" else FP8_MAX
    absmax = w.abs().amax(dim=1, keepdim=True)
    rounded = (absmax / qmax).to(s_dtype)
    s = compute_scales(w, kind, s_dtype)
    up = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
    bumped = s != rounded
    assert torch.equal(s[bumped], up[bumped])
    # bumped exactly where the rounded scale would have let |w / s| exceed qmax
    assert torch.equal(bumped, absmax / rounded.float() > qmax)
    if s_dtype != torch.float32:
        assert bool(bumped.any()), "bf16/fp16 rounding goes down on some rows"


def test_scale_bump_needed_even_for_float32():
    # absmax / 127 rounded to float32 can be a hair too small: 127 (1 + 2**-24) > 127 + ulp/2.
    hits = 0
    for k in range(4000):
        a = torch.tensor([[1.0 + k * 2.0**-20]], dtype=torch.float32)
        s = compute_scales(a, "int8", torch.float32)
        assert float(a / s) <= 127
        hits += bool(s != a / 127)
    assert hits > 0


@pytest.mark.parametrize("s_dtype", FLOATS)
def test_zero_and_underflowing_rows_get_positive_finite_scales(s_dtype):
    w = torch.zeros(3, 8)
    w[1, 0] = 1e-30  # absmax / 127 underflows bf16? no; fp16 and its subnormals: yes
    w[2, 1] = -1e-44  # float32 subnormal
    s = compute_scales(w, "int8", s_dtype)
    assert s[0, 0] == torch.finfo(s_dtype).eps  # what compressed-tensors writes
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    q, s2 = quantize_weight(w, "int8", s_dtype)
    assert torch.equal(s, s2)
    assert bool((dequantize(q, s) - w).abs().le(s.float() / 2).all())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_names_first_bad_row(value):
    w = torch.randn(200, 16).bfloat16()
    w[130, 7] = value
    w[171, 0] = value
    for call in (
        lambda: compute_scales(w, "int8", torch.bfloat16),
        lambda: quantize_weight(w, "int8", torch.float32, block_rows=64),
        lambda: quantize_weight(w, "fp8", torch.bfloat16, block_rows=7),
    ):
        with pytest.raises(NonFiniteWeightError, match="row 130, column 7") as exc:
            call()
        assert exc.value.row == 130 and exc.value.col == 7
        assert math.isnan(exc.value.value) if math.isnan(value) else exc.value.value == value
        assert isinstance(exc.value, ValueError)


def test_scale_overflowing_its_dtype_is_an_error():
    w = torch.full((2, 4), 1e9)
    with pytest.raises(ValueError, match="overflows"):
        compute_scales(w, "int8", torch.float16)
    with pytest.raises(ValueError, match="overflows"):
        quantize_weight(w, "fp8", torch.float16)


@pytest.mark.parametrize("qmax", [128, 127.5, 0, -3])
def test_bad_int8_qmax_rejected(qmax):
    with pytest.raises(ValueError, match="qmax"):
        compute_scales(torch.ones(2, 2), "int8", torch.float32, qmax)


def test_smaller_qmax_keeps_int8_in_range():
    w = _weights(torch.bfloat16)
    q, s = quantize_weight(w, "int8", torch.bfloat16, qmax=63)
    assert int(q.abs().max()) == 63
    assert _same_bits(q, _reference(w, "int8", torch.bfloat16, 63)[0])


def test_scales_match_compressed_tensors_fp8_observer():
    # For fp8, compressed-tensors' calculate_qparams is absmax / 448 in float32:
    # ours equals it, or its next float where it would let |w / s| exceed 448.
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _weights(torch.float32, rows=300)
    w[5:7] = 1.0
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    theirs, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    ours = compute_scales(w, "fp8", torch.float32)
    up = torch.nextafter(theirs, torch.full_like(theirs, math.inf))
    assert bool(((ours == theirs) | (ours == up)).all())


# ---------------------------------------------------------------- quantize


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("w_dtype,s_dtype", itertools.product(FLOATS, FLOATS))
def test_fast_path_bit_identical_random(kind, w_dtype, s_dtype):
    w = _weights(w_dtype, rows=150)
    q_ref, s_ref = _reference(w, kind, s_dtype)
    for block_rows in (1, 7, 64, 1000):
        q, s = quantize_weight(w, kind, s_dtype, block_rows=block_rows)
        assert torch.equal(s, s_ref)
        assert _same_bits(q, q_ref), block_rows


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("w_dtype", FLOATS)
def test_fast_path_bit_identical_on_ties(kind, w_dtype):
    w = _ties(kind).to(w_dtype)
    assert torch.equal(w.double(), _ties(kind)), "ties are exact in every input dtype"
    q_ref, s_ref = _reference(w, kind, torch.bfloat16)
    q, s = quantize_weight(w, kind, torch.bfloat16, block_rows=2)
    assert _same_bits(q, q_ref) and torch.equal(s, s_ref)
    x = (w.double() / s.double())[:, :-2]
    if kind == "int8":
        # half to even: k + 0.5 -> the even neighbour
        assert torch.equal(q[:, :-2].double(), torch.round(x))
        assert bool((q[:, :-2].long() % 2 == 0).all())
    else:
        # e4m3 ties go to the even mantissa (low bit of the byte clear)
        assert bool((q[:, :-2].view(torch.uint8) & 1 == 0).all())


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_bit_identical_extremes(kind):
    big = torch.finfo(torch.float32).max
    w = torch.tensor(
        [
            [big, -big / 3, 1.0, 0.0],
            [1e-45, -3e-45, 0.0, 7e-45],  # float32 subnormals
            [1e-38, 1e-39, -1e-40, 5e-41],
            [-0.0, 0.0, -0.0, 0.0],
        ]
    )
    q_ref, s_ref = _reference(w, kind, torch.float32)
    q, s = quantize_weight(w, kind, torch.float32)
    assert _same_bits(q, q_ref) and torch.equal(s, s_ref)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    wb = torch.tensor([[3.3e38, -1e38], [1e-40, 0.0]]).bfloat16()
    for s_dtype in (torch.float32, torch.bfloat16):
        q_ref, s_ref = _reference(wb, kind, s_dtype)
        q, s = quantize_weight(wb, kind, s_dtype)
        assert _same_bits(q, q_ref) and torch.equal(s, s_ref)


def test_fast_path_handles_strided_and_degenerate_shapes():
    base = _weights(torch.bfloat16, rows=40, cols=30)
    for w in (base.t(), base[::3, 1::2], base[:1], base[:, :1]):
        for kind in KINDS:
            q_ref, s_ref = _reference(w, kind, torch.bfloat16)
            q, s = quantize_weight(w, kind, torch.bfloat16, block_rows=8)
            assert _same_bits(q, q_ref) and torch.equal(s, s_ref)
    q, s = quantize_weight(torch.empty(0, 5), "int8", torch.float32)
    assert q.shape == (0, 5) and s.shape == (0, 1)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 12),
    kind=st.sampled_from(KINDS),
    w_dtype=st.sampled_from(FLOATS),
    s_dtype=st.sampled_from(FLOATS),
    block_rows=st.integers(1, 4),
    data=st.data(),
)
def test_fast_path_bit_identical_property(rows, cols, kind, w_dtype, s_dtype, block_rows, data):
    fmax = 65504.0 if torch.float16 in (w_dtype, s_dtype) else 2.0**100
    vals = data.draw(
        st.lists(
            st.floats(-fmax, fmax, allow_nan=False, width=32)
            | st.sampled_from([0.0, -0.0, 0.5, 1.5, 2.5, 127.0, 448.0, 1e-30]),
            min_size=rows * cols,
            max_size=rows * cols,
        )
    )
    w = torch.tensor(vals, dtype=torch.float32).reshape(rows, cols).to(w_dtype)
    try:
        q_ref, s_ref = _reference(w, kind, s_dtype)
    except ValueError:
        with pytest.raises(ValueError):
            quantize_weight(w, kind, s_dtype, block_rows=block_rows)
        return
    q, s = quantize_weight(w, kind, s_dtype, block_rows=block_rows)
    assert torch.equal(s, s_ref)
    assert _same_bits(q, q_ref)


@pytest.mark.parametrize("w_dtype", FLOATS)
@pytest.mark.parametrize("s_dtype", FLOATS)
def test_quantize_matches_compressed_tensors(w_dtype, s_dtype):
    # compressed-tensors' own quantize(), fed float32 values and the scale as stored.
    w = _weights(w_dtype, rows=64)
    for kind, typ in (("int8", "int"), ("fp8", "float")):
        args = QuantizationArgs(num_bits=8, type=typ, symmetric=True, strategy="channel")
        q, s = quantize_weight(w, kind, s_dtype)
        theirs = ct_quantize(w.float(), s.float(), None, args, dtype=q.dtype)
        assert _same_bits(q, theirs), kind
        back = ct_dequantize(q, s, None, args)
        assert torch.equal(back, dequantize(q, s, s_dtype)), kind


# ---------------------------------------------------------------- error bound


def test_fp8_half_step_matches_the_e4m3_grid():
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    grid = grid.float()
    pos = grid[torch.isfinite(grid) & (grid >= 0)].unique().sort().values
    assert torch.equal(fp8_half_step(pos[:-1]), (pos[1:] - pos[:-1]) / 2)
    assert torch.equal(fp8_half_step(-pos[:-1]), fp8_half_step(pos[:-1]))
    assert float(fp8_half_step(torch.tensor(448.0))) == 16.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("w_dtype,s_dtype", itertools.product(FLOATS, FLOATS))
def test_error_within_bound(kind, w_dtype, s_dtype):
    w = torch.cat([_weights(w_dtype, rows=64), _ties(kind).to(w_dtype)[:, :80]])
    q, s = quantize_weight(w, kind, s_dtype)
    for dq in FLOATS:
        ratio = quant_error_ratio(w, dequantize(q, s, dq), q, s, kind)
        assert float(ratio.max()) <= 1.0, dq
    # the bound is tight: random rows come close to half a step
    assert float(quant_error_ratio(w, dequantize(q, s), q, s, kind).max()) > 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_error_bound_catches_a_clamped_or_wrong_weight(kind):
    w = _weights(torch.float32, rows=32)
    q, s = quantize_weight(w, kind, torch.float32)
    small = s / 2  # too small a scale: values clamp at qmax
    q2 = quantize_int8(w, small) if kind == "int8" else quantize_fp8(w, small)
    assert float(quant_error_ratio(w, dequantize(q2, small), q2, small, kind).max()) > 1
    w_hat = dequantize(q, s)
    bound = max_quant_error(q, s, kind).expand(q.shape)
    w_hat[3, 4] = float(w[3, 4]) + 1.5 * float(bound[3, 4])
    assert float(quant_error_ratio(w, w_hat, q, s, kind)[3]) > 1
    w_hat[3, 4] = math.nan
    assert not bool(quant_error_ratio(w, w_hat, q, s, kind)[3] <= 1)


def test_max_quant_error_shapes():
    q, s = quantize_weight(torch.randn(4, 6), "int8", torch.bfloat16)
    assert max_quant_error(q, s, "int8").shape == (4, 1)
    q, s = quantize_weight(torch.randn(4, 6), "fp8", torch.bfloat16)
    b = max_quant_error(q, s, "fp8")
    assert b.shape == (4, 6) and b.dtype == torch.float64


# ---------------------------------------------------------------- decompress via compressed-tensors


def _scheme(kind: str, fmt: str) -> QuantizationScheme:
    typ = "int" if kind == "int8" else "float"
    weights = QuantizationArgs(num_bits=8, type=typ, symmetric=True, strategy="channel")
    acts = None
    if fmt in ("int-quantized", "float-quantized"):
        acts = QuantizationArgs(
            num_bits=8, type=typ, symmetric=True, strategy="token", dynamic=True
        )
    return QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=acts, format=fmt
    )


@pytest.mark.parametrize(
    "kind,fmt",
    [
        ("int8", "int-quantized"),  # W8A8
        ("int8", "pack-quantized"),  # W8A16
        ("fp8", "float-quantized"),  # FP8_DYNAMIC
        ("fp8", "naive-quantized"),  # FP8 weight-only
    ],
)
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_decompresses_within_bound(kind, fmt, s_dtype):
    w = _weights(torch.bfloat16, rows=48, cols=64)
    q, s = quantize_weight(w, kind, s_dtype)
    if fmt == "pack-quantized":
        sd = {
            "weight_packed": pack_int8(q),
            "weight_scale": s,
            "weight_shape": torch.tensor(list(w.shape)),
        }
    else:
        sd = {"weight": q, "weight_scale": s}
    scheme = _scheme(kind, fmt)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    w_hat = compressor.decompress(sd, scheme)["weight"]
    assert w_hat.shape == w.shape and w_hat.dtype == s_dtype
    assert torch.equal(w_hat, dequantize(q, s, s_dtype))
    assert float(quant_error_ratio(w, w_hat, q, s, kind).max()) <= 1.0

    # and their compressor, given our scale, writes exactly our tensors
    theirs = compressor.compress({"weight": w.float(), "weight_scale": s.float()}, scheme)
    if fmt == "pack-quantized":
        assert torch.equal(theirs["weight_packed"], sd["weight_packed"])
    else:
        assert _same_bits(theirs["weight"], q)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("cols", [4, 8, 12, 64, 1, 5, 6, 7, 33])
def test_pack_matches_compressed_tensors(cols):
    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-128, 128, (5, cols), dtype=torch.int8, generator=g)
    q[0, 0], q[-1, -1] = -128, 127
    packed = pack_int8(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols // 4))
    assert torch.equal(packed, ct_helpers.pack_to_int32(q, 8))
    assert torch.equal(unpack_int8(packed, (5, cols)), q)
    assert torch.equal(ct_helpers.unpack_from_int32(packed, 8, torch.Size([5, cols])), q)
    # the endian-independent fallback agrees with the byte view
    u = (q.view(torch.uint8) ^ 0x80).contiguous()
    u = torch.nn.functional.pad(u, (0, 4 * packed.shape[1] - cols))
    assert torch.equal(_pack_bytes_arith(u), packed)
    assert torch.equal(_unpack_bytes_arith(packed)[:, :cols], u[:, :cols])


def test_pack_layout_is_the_documented_one():
    q = torch.tensor([[-128, -1, 0, 127, 5]], dtype=torch.int8)
    packed = pack_int8(q)
    u = [0, 127, 128, 255]
    word = sum(b << (8 * j) for j, b in enumerate(u))
    assert int(packed[0, 0]) == word - 2**32  # read as int32
    assert int(packed[0, 1]) == 133  # u = 5 + 128, zero padding bytes


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int8(torch.zeros(2, 4))
    with pytest.raises(ValueError):
        unpack_int8(torch.zeros(2, 2, dtype=torch.int32), (2, 12))
    with pytest.raises(ValueError):
        unpack_int8(torch.zeros(2, 2, dtype=torch.int64), (2, 8))


# --- the check every block passes before it is written ------------------------------------


@pytest.mark.parametrize("qtype", ["int8", "fp8"])
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_block_passes_every_correct_block(qtype, s_dtype):
    g = torch.Generator().manual_seed(11)
    for w in (
        torch.randn(64, 300, generator=g),
        torch.randn(64, 300, generator=g) ** 5,  # heavy tails: most values tiny
        torch.randn(64, 300, generator=g) * 1e-6,
        torch.zeros(8, 300),
    ):
        for dtype in (torch.float32, torch.bfloat16):
            wd = w.to(dtype)
            q, s = quantize_weight(wd, qtype, s_dtype)
            assert check_block(wd, q, s, qtype) is None


@pytest.mark.parametrize("qtype", ["int8", "fp8"])
def test_check_block_catches_what_a_bug_would_write(qtype):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(12)).bfloat16()
    q, s = quantize_weight(w, qtype, torch.bfloat16)

    def one_step(q):
        q = q.clone()
        if qtype == "int8":
            q[5, 7] += 1 if q[5, 7] < 127 else -1
        else:  # two e4m3 steps up: beyond rounding anywhere in the value's binade
            bits = q.view(torch.uint8)
            bits[5, 7] += 2
        return q

    swapped = q.clone()
    swapped[[3, 9]] = q[[9, 3]]
    assert check_block(w, one_step(q), s, qtype) == 5
    assert check_block(w, swapped, s, qtype) == 3
    assert check_block(w, q, s * 2, qtype) == 0
    nan = s.clone()
    nan[4] = float("nan")
    assert check_block(w, q, nan, qtype) == 4
