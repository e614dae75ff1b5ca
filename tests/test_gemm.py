"""qcli.gemm: each quantized path against float64 references, exactness, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from qcli import gemm
from qcli.gemm import (
    FP8_MIN_SCALE,
    INT8PACK_MAX_TOKENS,
    _exact_matmul_f64,
    cpu_features,
    dense,
    fp8_dynamic,
    fp8_weight_only,
    int8_gemm_may_saturate,
    quantize_activations_fp8,
    quantize_activations_int8,
    saturating_u8s8_emulation,
    w8a8_int8,
    w8a16,
)
from qcli.numerics.metrics import compare
from qcli.quant import fp8_half_step, quantize_weight

SHAPES = [(1, 64, 48), (3, 7, 5), (17, 96, 40), (33, 130, 9)]


def _data(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    x[0, 0] = 8.0  # an outlier channel, as real activations have
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    return x, w


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-300))


# ---------------------------------------------------------------- activations


def test_int8_activations_per_token():
    x, _ = _data(6, 50, 1)
    x[3] = 0
    xq, s = quantize_activations_int8(x)
    assert xq.dtype == torch.int8 and s.shape == (6, 1) and s.dtype == torch.float32
    a = x.float().abs().amax(dim=1, keepdim=True)
    assert torch.equal(s, a / 127)
    assert torch.equal(xq[3], torch.zeros(50, dtype=torch.int8)) and float(s[3]) == 0
    live = [0, 1, 2, 4, 5]
    assert torch.equal(xq[live].abs().amax(dim=1), torch.full((5,), 127, dtype=torch.int8))
    err = (xq.double() * s.double() - x.double()).abs()
    assert bool((err <= s.double() * (0.5 + 1e-5)).all())


def test_int8_activations_round_half_even():
    # 127 / a = 1 exactly, so x * inv lands on ties
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])
    xq, _ = quantize_activations_int8(x)
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_fp8_activations_per_token():
    x, _ = _data(5, 40, 1)
    x[2] = 0
    xq, s = quantize_activations_fp8(x)
    assert xq.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    a = x.float().abs().amax(dim=1, keepdim=True)
    assert torch.equal(s, (a / 448).clamp(min=FP8_MIN_SCALE))
    assert s[2, 0] == torch.tensor(FP8_MIN_SCALE) and not bool(xq[2].float().any())
    live = [0, 1, 3, 4]
    assert torch.equal(xq[live].float().abs().amax(dim=1), torch.full((4,), 448.0))
    x_over_s = x.double() / s.double()
    err = (xq.double() - x_over_s).abs()
    assert bool((err <= fp8_half_step(xq).double() * (1 + 1e-6)).all())


# ---------------------------------------------------------------- exact references


def test_exact_matmul_is_exact():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (4, 3000), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (7, 3000), dtype=torch.int8, generator=g)
    assert torch.equal(_exact_matmul_f64(a, b).long(), a.long() @ b.long().t())
    # e4m3 values are integers in units of 2**-9: compare in exact int64 units
    fa = (torch.randn(4, 3000, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    fb = (torch.randn(7, 3000, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    ia, ib = (fa.double() * 512).long(), (fb.double() * 512).long()
    assert torch.equal((_exact_matmul_f64(fa, fb) * 2.0**18).long(), ia @ ib.t())


# ---------------------------------------------------------------- schemes


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a8_int8(m, k, n):
    x, w = _data(m, k, n)
    q, s = quantize_weight(w, "int8", torch.bfloat16)
    run = w8a8_int8(x, q, s)
    assert run.kernel == "torch._int_mm"
    assert run.exact is True, run.note
    assert run.out.dtype == torch.float32 and run.out.shape == (m, n)
    xq, xs = quantize_activations_int8(x)
    ref = (xq.double() @ q.double().t()) * s.double().t() * xs.double()
    assert _rel(run.out, ref) < 1e-6
    assert compare(run.out, dense(x, w))["sqnr_db"] > 30


def test_w8a8_int8_check_switch_and_worst_case_operands():
    # Every product at its extreme: an int16-saturating kernel would be far off.
    m, k, n = 80, 256, 24
    x = torch.full((m, k), 1.0)
    x[::2] = -1.0
    q = torch.full((n, k), 127, dtype=torch.int8)
    q[::3] = -128
    s = torch.full((n, 1), 0.01)
    assert w8a8_int8(x, q, s).exact is None  # M > 64: not checked by default
    run = w8a8_int8(x, q, s, check=True)
    assert run.exact is True
    # row 0 is all -1: xq = -127, x_scale = 1/127, so out = -k * q * 0.01
    expected = -k * q[:, 0].double() * 0.01
    assert torch.allclose(run.out[0].double(), expected, rtol=1e-6, atol=0)
    assert w8a8_int8(x[:2], q, s, check=False).exact is None


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a16(m, k, n):
    x, w = _data(m, k, n)
    q, s = quantize_weight(w, "int8", torch.bfloat16)
    run = w8a16(x, q, s)
    if m <= INT8PACK_MAX_TOKENS:  # a GEMV kernel: a few tokens only
        assert run.kernel == "aten._weight_int8pack_mm (float32)", run.note
    else:
        assert run.kernel == "dequantized int8 weight, float32 F.linear"
    assert run.exact is None
    ref = x.double() @ (q.double() * s.double()).t()
    assert _rel(run.out, ref) < 1e-5
    assert compare(run.out, dense(x, w))["sqnr_db"] > 35


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp8_dynamic(m, k, n):
    x, w = _data(m, k, n)
    q, s = quantize_weight(w, "fp8", torch.bfloat16)
    run = fp8_dynamic(x, q, s)
    assert run.kernel == "torch._scaled_mm"
    assert run.exact is not None and "max |out - exact|" in run.note
    xq, xs = quantize_activations_fp8(x)
    ref = (xq.double() @ q.double().t()) * s.double().t() * xs.double()
    assert _rel(run.out, ref) < 1e-5  # float32 accumulation, nothing worse
    assert compare(run.out, dense(x, w))["sqnr_db"] > 25
    assert fp8_dynamic(x, q, s, check=False).exact is None


def test_fp8_dynamic_exact_when_float32_accumulation_is():
    # Small integers: every partial sum is exact in float32, so the kernel must be too.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-16, 17, (4, 64), generator=g).float()
    x[:, 0] = 448  # per-token scale 1: xq == x
    q = torch.randint(-16, 17, (8, 64), generator=g).float().to(torch.float8_e4m3fn)
    run = fp8_dynamic(x, q, torch.ones(8, 1))
    assert run.exact is True
    assert torch.equal(run.out.double(), x.double() @ q.double().t())


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp8_weight_only(m, k, n):
    x, w = _data(m, k, n)
    q, s = quantize_weight(w, "fp8", torch.float32)
    run = fp8_weight_only(x, q, s)
    assert run.exact is None and "F.linear" in run.kernel
    ref = x.double() @ (q.double() * s.double()).t()
    assert _rel(run.out, ref) < 1e-5
    assert compare(run.out, dense(x, w))["sqnr_db"] > 25


def test_dense_matches_float64():
    x, w = _data(9, 100, 33)
    assert _rel(dense(x, w), x.double() @ w.double().t()) < 1e-6


def test_wrong_operands_rejected():
    x, w = _data(2, 16, 4)
    q, s = quantize_weight(w, "int8", torch.float32)
    with pytest.raises(ValueError):
        w8a8_int8(x[:, :8], q, s)
    with pytest.raises(ValueError):
        fp8_dynamic(x, q, s)  # int8 weight on the fp8 path
    with pytest.raises(ValueError):
        w8a16(x, q, s[:3])


# ---------------------------------------------------------------- metrics


def test_compare_known_cases():
    ref = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert compare(ref, ref) == {
        "sqnr_db": math.inf,
        "cosine": 1.0,
        "max_rel_err": 0.0,
        "max_abs_err": 0.0,
    }
    m = compare(ref * 1.1, ref)
    assert m["sqnr_db"] == pytest.approx(20.0)
    assert m["cosine"] == pytest.approx(1.0)
    assert m["max_rel_err"] == pytest.approx(0.1)
    m = compare(-ref, ref)
    assert m["cosine"] == pytest.approx(-1.0)
    assert m["sqnr_db"] == pytest.approx(-10 * math.log10(4))
    m = compare(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert m["cosine"] == 0.0 and m["sqnr_db"] == pytest.approx(-10 * math.log10(2))
    m = compare(torch.tensor([1.0, 0.5]), torch.zeros(2))
    assert m["sqnr_db"] == -math.inf and m["cosine"] == 0.0 and m["max_rel_err"] == math.inf
    assert compare(torch.zeros(3), torch.zeros(3))["cosine"] == 1.0
    m = compare(torch.tensor([math.nan, 1.0]), torch.tensor([1.0, 1.0]))
    assert all(math.isnan(v) for v in m.values())
    with pytest.raises(ValueError):
        compare(torch.zeros(2), torch.zeros(3))


def test_compare_max_rel_err_is_relative_to_the_range():
    ref = torch.tensor([100.0, 1.0])
    y = torch.tensor([100.0, 2.0])  # 100% off on a small element
    assert compare(y, ref)["max_rel_err"] == pytest.approx(0.01)


# ---------------------------------------------------------------- CPU features, saturation


def test_cpu_features_parses_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma f16c\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n"
    )
    f = cpu_features(info)
    assert f == {
        "avx2": True,
        "avx512f": False,
        "avx512_vnni": False,
        "avx_vnni": False,
        "amx": False,
    }
    assert int8_gemm_may_saturate(f) is True
    assert cpu_features(tmp_path / "missing") == dict.fromkeys(f, False)
    here = cpu_features()
    assert set(here) == set(f) and all(isinstance(v, bool) for v in here.values())


@pytest.mark.parametrize(
    "flags,saturates",
    [
        ({"avx2": True}, True),
        ({"avx2": True, "avx512f": True}, True),
        ({"avx2": True, "avx_vnni": True}, False),
        ({"avx2": True, "avx512f": True, "avx512_vnni": True}, False),
        ({"avx2": True, "avx512f": True, "amx": True}, False),
        ({}, False),
    ],
)
def test_int8_gemm_may_saturate(flags, saturates):
    assert int8_gemm_may_saturate(flags) is saturates


def test_saturating_emulation_model():
    g = torch.Generator().manual_seed(4)
    xq = torch.randint(-128, 128, (3, 61), dtype=torch.int8, generator=g)  # odd K
    q63 = torch.randint(-63, 64, (11, 61), dtype=torch.int8, generator=g)
    exact = xq.long() @ q63.long().t()
    assert torch.equal(saturating_u8s8_emulation(xq, q63), exact)  # |w| <= 63: exact
    # worst case: u = 255 and w = 127 everywhere: each pair clamps 64770 -> 32767
    k = 64
    xmax = torch.full((1, k), 127, dtype=torch.int8)
    wmax = torch.full((1, k), 127, dtype=torch.int8)
    got = int(saturating_u8s8_emulation(xmax, wmax)[0, 0])
    assert got == (k // 2) * 32767 - 128 * k * 127
    assert got != k * 127 * 127
    # full-range weights on random data: some outputs differ
    qfull = torch.randint(-128, 128, (11, 61), dtype=torch.int8, generator=g)
    assert bool((saturating_u8s8_emulation(xq, qfull) != xq.long() @ qfull.long().t()).any())


@pytest.mark.parametrize("k", [7, 64, 129])
def test_saturating_emulation_equals_the_pairwise_formula(k):
    """The emulation evaluates only the weight pairs that can leave int16; it must equal the
    formula over every pair: sum_i sat16(u[2i] w[2i] + u[2i+1] w[2i+1]) - 128 sum_k w[k]."""
    g = torch.Generator().manual_seed(k)
    xq = torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=g)
    q = torch.randint(-127, 128, (9, k), dtype=torch.int8, generator=g)
    q[0] = 127  # a row of full-range weights: every pair clips for large u
    xq[0] = 127
    u = torch.nn.functional.pad(xq.long() + 128, (0, k % 2)).view(5, 1, -1, 2)
    w = torch.nn.functional.pad(q.long(), (0, k % 2)).view(1, 9, -1, 2)
    pairs = (u * w).sum(-1).clamp(-32768, 32767).sum(-1)
    want = pairs - 128 * q.long().sum(1).view(1, -1)
    got = gemm.saturating_u8s8_emulation(xq, q)
    assert torch.equal(got, want)
    exact = xq.long() @ q.long().t()
    assert not torch.equal(got, exact)  # it does clip here
    want_dev = float((got - exact).abs().max()) / float(exact.abs().max())
    assert gemm.saturating_u8s8_deviation(xq, q) == pytest.approx(want_dev, rel=1e-12)
