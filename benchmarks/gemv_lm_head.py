#!/usr/bin/env python3
"""One-token lm_head GEMV on this CPU: bf16 vs the int8 (and fp8) weight paths in torch.

For each shape (N = vocab rows, K = hidden), y[1, N] = x[1, K] @ W[N, K]^T with
  bf16        F.linear(x_bf16, W_bf16)                                   2 B/weight
  fp32        F.linear(x_fp32, W_fp32)  (reference only)                 4 B/weight
  int8pack    aten._weight_int8pack_mm(x_bf16, W_int8, s_bf16[N])        1 B/weight
  qlinear_dyn quantized.linear_dynamic(x_fp32, prepacked qint8 per-channel), per engine
              (x86 / fbgemm / onednn): activation quantized inside, 1 B/weight
  int_mm      per-token int8 x (absmax/127), torch._int_mm(x8, W8^T) -> int32, * sx * sw
              (_int_mm wants M > 16 on some builds: x is padded to 17 rows, timed)
  dequant     (W_int8.to(bf16) * s) then F.linear: dequantizes the whole matrix per call
  fp8_scaled  torch._scaled_mm(x_fp8, W_fp8^T, sx, sw, out bf16), when this torch has it

Memory bandwidth is measured first: `dst.copy_(src)` of 1 GiB (reported as read+write
bytes / s) and a read-only pass (`sum` over an int64 view of 1 GiB). The bound for a path
is weight bytes / read bandwidth; "of bound" = bound / measured time (1.0 = reading the
weights at full memory speed). Between timed calls a 512 MiB buffer is read so the weights
come from DRAM, as in decoding where every other layer's weights pass through the cache in
between (--hot skips that). Paths are interleaved (A B C ... A B C), each timed `--reps`
times after warm-up; medians reported. Every path's output is checked against the fp32
product of the dequantized weight (relative error of the max).

    python benchmarks/gemv_lm_head.py                      # both shapes, 2 threads
    python benchmarks/gemv_lm_head.py --shape 32000x2048 --reps 30 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

GIB = 1 << 30


def bandwidth(reps: int) -> dict:
    src = torch.ones(GIB // 8, dtype=torch.int64)
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - t)
    return {
        "copy_gbs": 2 * GIB / statistics.median(copy) / 1e9,  # read + write bytes
        "copy_gbs_dst_only": GIB / statistics.median(copy) / 1e9,
        "read_gbs": GIB / statistics.median(read) / 1e9,
    }


def make_paths(n: int, k: int, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).mul_(0.02).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    # per-channel symmetric int8
    wf = w.float()
    s = wf.abs().amax(dim=1).div_(127.0).clamp_(min=1e-12)
    w8 = torch.round(wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
    s_bf = s.to(torch.bfloat16)
    ref = x.float() @ (w8.float() * s_bf.float()[:, None]).t()  # what the int8 paths compute
    del wf

    paths: dict[str, tuple] = {}  # name -> (fn, weight bytes)
    paths["bf16"] = (lambda: F.linear(x, w), w.numel() * 2)

    wt32 = None

    def fp32_setup():
        nonlocal wt32
        wt32 = w.float()
    paths["fp32"] = (lambda: F.linear(x.float(), wt32), w.numel() * 4, fp32_setup)

    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        paths["int8pack"] = (lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s_bf), w8.numel())

    for eng in ("x86", "fbgemm", "onednn"):
        if eng not in torch.backends.quantized.supported_engines:
            continue
        try:
            torch.backends.quantized.engine = eng
            qw = torch.quantize_per_channel(
                w8.float() * s[:, None], s.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8
            )
            packed = torch.ops.quantized.linear_prepack(qw, None)

            def fn(packed=packed, eng=eng):
                torch.backends.quantized.engine = eng
                return torch.ops.quantized.linear_dynamic(x.float(), packed, False)
            fn()
            paths[f"qlinear_dyn[{eng}]"] = (fn, w8.numel())
        except Exception as e:  # engine unavailable for this shape/CPU
            print(f"skip qlinear_dyn[{eng}]: {e}", file=sys.stderr)
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "none"

    w8t = w8.t()
    sw = s.float()

    def int_mm():
        xf = x.float()
        sx = xf.abs().amax(dim=1, keepdim=True).div_(127.0).clamp_(min=1e-12)
        x8 = torch.round(xf / sx).to(torch.int8)
        xp = torch.zeros(17, k, dtype=torch.int8)
        xp[:1] = x8
        acc = torch._int_mm(xp, w8t)[:1]
        return (acc.float() * sx * sw).to(torch.bfloat16)
    try:
        int_mm()
        paths["int_mm(per-token)"] = (int_mm, w8.numel())
    except Exception as e:
        print(f"skip int_mm: {e}", file=sys.stderr)

    paths["dequant+bf16"] = (lambda: F.linear(x, w8.to(torch.bfloat16) * s_bf[:, None]), w8.numel())

    if hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn"):
        try:
            fmax = torch.finfo(torch.float8_e4m3fn).max
            s8 = (w.float().abs().amax(dim=1) / fmax).clamp_(min=1e-12)
            w_f8 = (w.float() / s8[:, None]).to(torch.float8_e4m3fn)
            s8r = s8.reshape(1, n)

            def fp8():
                xf = x.float()
                sx = (xf.abs().amax(dim=1, keepdim=True) / fmax).clamp_(min=1e-12)
                x8 = (xf / sx).to(torch.float8_e4m3fn)
                return torch._scaled_mm(x8, w_f8.t(), scale_a=sx, scale_b=s8r, out_dtype=torch.bfloat16)
            fp8()
            paths["fp8_scaled_mm"] = (fp8, w_f8.numel())
        except Exception as e:
            print(f"skip fp8_scaled_mm: {e}", file=sys.stderr)
    return paths, ref, w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shape", action="append", help="NxK (default 32000x2048 and 128256x4096)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--hot", action="store_true", help="do not flush the cache between calls")
    ap.add_argument("--skip", action="append", default=[], help="path names to skip")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    shapes = [tuple(map(int, s.lower().split("x"))) for s in (a.shape or ["32000x2048", "128256x4096"])]

    bw = bandwidth(7)
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": a.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": platform.processor() or open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "),
        "flush": not a.hot, **{k: round(v, 2) for k, v in bw.items()},
    }
    print(f"# {info['date']} torch {info['torch']} {info['cpu_capability']} threads={a.threads} "
          f"{info['cpu']}; memory: copy {bw['copy_gbs']:.1f} GB/s (r+w), read {bw['read_gbs']:.1f} GB/s; "
          f"{'hot cache' if a.hot else 'weights from DRAM (cache flushed between calls)'}")
    flush_buf = None if a.hot else torch.ones(512 << 20 >> 3, dtype=torch.int64)
    results = []
    for n, k in shapes:
        paths, ref, _ = make_paths(n, k)
        paths = {p: v for p, v in paths.items() if p not in a.skip}
        for v in paths.values():
            if len(v) > 2:
                v[2]()
        times = {p: [] for p in paths}
        errs = {}
        for p, (fn, *_rest) in paths.items():
            for _ in range(a.warmup):
                out = fn()
            errs[p] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        for _ in range(a.reps):
            for p, (fn, *_rest) in paths.items():
                if flush_buf is not None:
                    flush_buf.sum()
                t = time.perf_counter()
                fn()
                times[p].append(time.perf_counter() - t)
        base = statistics.median(times["bf16"])
        print(f"\n## lm_head {n}x{k}, one token: bf16 weights {n * k * 2 / 1e6:.0f} MB, int8 {n * k / 1e6:.0f} MB\n")
        print("| path | weight MB | median ms | min ms | vs bf16 | bound ms | of bound | max rel err |")
        print("|---|---|---|---|---|---|---|---|")
        for p, (fn, wbytes, *_r) in paths.items():
            m = statistics.median(times[p])
            bound = wbytes / (bw["read_gbs"] * 1e9)
            row = {"shape": f"{n}x{k}", "path": p, "weight_mb": wbytes / 1e6, "median_ms": m * 1e3,
                   "min_ms": min(times[p]) * 1e3, "speedup_vs_bf16": base / m, "bound_ms": bound * 1e3,
                   "of_bound": bound / m, "max_rel_err": errs[p]}
            results.append(row)
            print(f"| {p} | {wbytes / 1e6:.0f} | {m * 1e3:.2f} | {min(times[p]) * 1e3:.2f} | {base / m:.2f}x "
                  f"| {bound * 1e3:.2f} | {bound / m:.0%} | {errs[p]:.1e} |")
        del paths
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
