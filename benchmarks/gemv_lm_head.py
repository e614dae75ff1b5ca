#!/usr/bin/env python3
"""One-token lm_head GEMV on this CPU: bf16 vs the int8 (and fp8) weight paths in torch.

For each shape (N = vocab rows, K = hidden), y[1, N] = x[1, K] @ W[N, K]^T with
  bf16          F.linear(x_bf16, W_bf16)                                 2 B/weight
  fp32          F.linear(x_fp32, W_fp32)  (reference only)               4 B/weight
  int8pack      aten._weight_int8pack_mm(x_bf16, W_int8, s_bf16[N])      1 B/weight
  qlinear_dyn   quantized.linear_dynamic(x_fp32, prepacked qint8 per-channel weight),
                per engine (x86 / fbgemm / onednn); x is quantized inside   1 B/weight
  int_mm        per-token int8 x (absmax/127), torch._int_mm(x8, W8^T) -> int32,
                then * sx * sw -> bf16                                    1 B/weight
  dequant+bf16  (W_int8.to(bf16) * s) then F.linear: the whole matrix per call
  fp8_scaled_mm torch._scaled_mm(x_fp8, W_fp8^T, sx, sw, out bf16)      1 B/weight

Timing, made for a 2-vCPU VM whose idle threads wake up late (a call right after a
sleep or a sync point can take 5-12 ms longer, whatever its size):
  * weights come from DRAM, as in decoding, where every other layer's weights pass
    through the cache between two lm_head calls: each path gets enough copies of its
    weight to stream at least --rotate MiB (default 768, about 3x this VM's reported
    260 MiB L3) and a timed batch calls it once on each copy, back to back;
  * one untimed call on the batch's last copy precedes it, so threads are awake (that
    copy is evicted again by the time the batch reaches it);
  * paths are interleaved (A B C ... A B C), --reps batches each; per-call time =
    batch time / copies; medians (and the best batch) reported.
Memory bandwidth: two read-only probes over 1 GiB run inside the same rotation as the
paths, so they see the same load from other processes: `sum` of int64 and fp32 `torch.mv`
(MKL's GEMV: 2 flops per 4 bytes, memory-bound; on a quiet machine it reads faster than
`sum`); the read bandwidth is the faster of the two medians. `sum` and `copy_` of 1 GiB
are also reported once at the start. The bound of a path is
weight bytes / read bandwidth; "of bound" = bound / median time (1.0 = weights read at the
measured memory speed). A path slower than both 50 ms and 20x the time of reading its
weight at 10 GB/s is compute-bound: it gets one copy and 3 batches. Each path's output is checked
against the fp32 product of the weights it holds (max error / max |y|).

    python benchmarks/gemv_lm_head.py                       # both shapes, all cores
    python benchmarks/gemv_lm_head.py --shape 32000x2048 --reps 20 --json /tmp/gemv.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

GIB = 1 << 30


def bandwidth(reps: int) -> dict:
    src = torch.ones(GIB // 8, dtype=torch.int64)
    dst = torch.empty_like(src)
    copy, read = [], []
    dst.copy_(src)
    src.sum()
    for _ in range(reps):
        t = time.perf_counter()
        src.sum()
        src.sum()
        read.append((time.perf_counter() - t) / 2)
        t = time.perf_counter()
        dst.copy_(src)
        dst.copy_(src)
        copy.append((time.perf_counter() - t) / 2)
    return {
        "read_gbs": GIB / statistics.median(read) / 1e9,
        "copy_gbs_rw": 2 * GIB / statistics.median(copy) / 1e9,  # read + write bytes
    }


class Weights:
    """One lm_head weight in every form the paths need (built once, copied per path)."""

    def __init__(self, n: int, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.k = n, k
        self.w = torch.randn(n, k, generator=g).mul_(0.02).to(torch.bfloat16)
        self.x = torch.randn(1, k, generator=g).to(torch.bfloat16)
        wf = self.w.float()
        self.s = wf.abs().amax(dim=1).div_(127.0).clamp_(min=1e-12)  # per-channel, symmetric
        self.w8 = torch.round(wf / self.s[:, None]).clamp_(-127, 127).to(torch.int8)
        self.s_bf = self.s.to(torch.bfloat16)


def path_builders(W: Weights) -> dict:
    """name -> (bytes of weight read per call, prepare() -> state, call(state) -> y[1, N]).
    prepare() returns a fresh copy each time (its own memory)."""
    x, n = W.x, W.n
    P: dict = {}
    P["bf16"] = (W.w.numel() * 2, lambda: W.w.clone(), lambda w: F.linear(x, w))
    P["fp32"] = (W.w.numel() * 4, lambda: W.w.float(), lambda w: F.linear(x.float(), w))
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        P["int8pack"] = (
            W.w8.numel(),
            lambda: W.w8.clone(),
            lambda w8: torch.ops.aten._weight_int8pack_mm(x, w8, W.s_bf),
        )
    for eng in ("x86", "fbgemm", "onednn"):
        if eng not in torch.backends.quantized.supported_engines:
            continue

        def prep(eng=eng):
            torch.backends.quantized.engine = eng
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qw = torch.quantize_per_channel(
                    W.w8.float() * W.s[:, None],
                    W.s.double(),
                    torch.zeros(n, dtype=torch.long),
                    0,
                    torch.qint8,
                )
            return torch.ops.quantized.linear_prepack(qw, None)

        def call(packed, eng=eng):
            torch.backends.quantized.engine = eng
            return torch.ops.quantized.linear_dynamic(x.float(), packed, False)

        P[f"qlinear_dyn[{eng}]"] = (W.w8.numel(), prep, call)

    sw = W.s.float()

    def int_mm(w8t):
        xf = x.float()
        sx = xf.abs().amax(dim=1, keepdim=True).div_(127.0).clamp_(min=1e-12)
        x8 = torch.round(xf / sx).to(torch.int8)
        return (torch._int_mm(x8, w8t).float() * sx * sw).to(torch.bfloat16)

    P["int_mm(per-token)"] = (W.w8.numel(), lambda: W.w8.clone().t(), int_mm)
    P["dequant+bf16"] = (
        W.w8.numel(),
        lambda: W.w8.clone(),
        lambda w8: F.linear(x, w8.to(torch.bfloat16) * W.s_bf[:, None]),
    )
    if hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn"):
        fmax = torch.finfo(torch.float8_e4m3fn).max
        s8 = (W.w.float().abs().amax(dim=1) / fmax).clamp_(min=1e-12)

        def fp8(wt):
            xf = x.float()
            sx = (xf.abs().amax(dim=1, keepdim=True) / fmax).clamp_(min=1e-12)
            x8 = (xf / sx).to(torch.float8_e4m3fn)
            return torch._scaled_mm(
                x8, wt, scale_a=sx, scale_b=s8.reshape(1, n), out_dtype=torch.bfloat16
            )

        P["fp8_scaled_mm"] = (
            W.w8.numel(),
            lambda: (W.w.float() / s8[:, None]).to(torch.float8_e4m3fn).t(),
            fp8,
        )
    return P


def reference(W: Weights, name: str) -> torch.Tensor:
    """What the path should compute, in fp32, from the weight it holds."""
    if name in ("bf16", "fp32"):
        return W.x.float() @ W.w.float().t()
    if name == "fp8_scaled_mm":
        return W.x.float() @ W.w.float().t()  # fp8 rounding is part of the path's error
    return W.x.float() @ (W.w8.float() * W.s_bf.float()[:, None]).t()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("--shape", action="append", help="NxK (default 32000x2048 and 128256x4096)")
    ap.add_argument("--reps", type=int, default=10, help="timed batches per path")
    ap.add_argument("--rotate", type=int, default=768, help="MiB of weight copies per path")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip", action="append", default=[], help="path names to skip")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    shapes = [
        tuple(map(int, s.lower().split("x"))) for s in (a.shape or ["32000x2048", "128256x4096"])
    ]

    bw = bandwidth(5)
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": a.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu,
        "rotate_mib": a.rotate,
        **{k: round(v, 2) for k, v in bw.items()},
    }
    print(
        f"# {info['date']} · torch {info['torch']} ({info['cpu_capability']}) · {cpu} · "
        f"{a.threads} threads · memory read {bw['read_gbs']:.1f} GB/s, "
        f"copy {bw['copy_gbs_rw']:.1f} GB/s (read+write bytes) · weights streamed from DRAM "
        f"(>= {a.rotate} MiB of copies per path)"
    )
    results = []
    membuf = torch.ones(GIB // 8, dtype=torch.int64)
    mvmat = torch.ones(GIB // 4 // 4096, 4096)  # 1 GiB fp32: mv reads it once, 2 flop / 4 B
    mvvec = torch.ones(4096)
    probes = {
        "(read: int64 sum)": (GIB, lambda b: b.sum(), [membuf]),
        "(read: fp32 mv)": (GIB, lambda m: torch.mv(m, mvvec), [mvmat]),
    }
    for n, k in shapes:
        W = Weights(n, k)
        builders = {p: v for p, v in path_builders(W).items() if p not in a.skip}
        paths, errs, slow = {}, {}, set()
        for p, (wbytes, prep, call) in builders.items():
            try:
                st0 = prep()
                y = call(st0)
                ref = reference(W, p)
                errs[p] = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                t1 = math.inf
                for _ in range(2):
                    t = time.perf_counter()
                    call(st0)
                    t1 = min(t1, time.perf_counter() - t)
                if t1 > max(0.05, 20 * wbytes / 10e9):  # far from memory-bound: 1 copy, 3 reps
                    slow.add(p)
                    states = [st0]
                else:
                    copies = max(1, math.ceil(a.rotate * 2**20 / wbytes))
                    states = [st0] + [prep() for _ in range(copies - 1)]
                paths[p] = (wbytes, call, states)
            except Exception as e:  # path missing in this build / CPU
                print(f"skip {p}: {type(e).__name__}: {e}", file=sys.stderr)
        # the memory-read probes run in the same rotation, so the bound sees the same load
        paths.update(probes)
        times: dict = {p: [] for p in paths}
        for rep in range(a.reps):
            for p, (_wb, call, states) in paths.items():
                if p in slow and rep >= 3:
                    continue
                call(states[-1])  # wake-up; evicted again by the time the batch reaches it
                t = time.perf_counter()
                for st in states:
                    call(st)
                times[p].append((time.perf_counter() - t) / len(states))
        probe_gbs = {}
        for p in probes:
            probe_gbs[p] = GIB / statistics.median(times.pop(p)) / 1e9
            paths.pop(p)
        read_gbs = max(probe_gbs.values())  # the best read rate seen is the bound
        base = statistics.median(times["bf16"])
        print(
            f"\n## lm_head {n}x{k}, one token: "
            f"bf16 weight {n * k * 2 / 1e6:.0f} MB, int8 {n * k / 1e6:.0f} MB; "
            f"memory read in this run {read_gbs:.1f} GB/s ("
            + ", ".join(f"{p[7:-1]} {v:.1f}" for p, v in probe_gbs.items())
            + f"); load {os.getloadavg()[0]:.1f}\n"
        )
        print(
            "| path | weight MB | median ms | best ms | vs bf16 | bound ms | of bound | rel err |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for p, (wbytes, _c, states) in paths.items():
            m = statistics.median(times[p])
            bound = wbytes / (read_gbs * 1e9)
            results.append(
                {
                    "shape": f"{n}x{k}",
                    "path": p,
                    "weight_mb": wbytes / 1e6,
                    "copies": len(states),
                    "reps": len(times[p]),
                    "median_ms": m * 1e3,
                    "best_ms": min(times[p]) * 1e3,
                    "speedup_vs_bf16": base / m,
                    "read_gbs": read_gbs,
                    "bound_ms": bound * 1e3,
                    "of_bound": bound / m,
                    "rel_err": errs[p],
                }
            )
            print(
                f"| {p}{' (compute-bound: 1 copy, 3 reps)' if p in slow else ''} "
                f"| {wbytes / 1e6:.0f} | {m * 1e3:.2f} | {min(times[p]) * 1e3:.2f} "
                f"| {base / m:.2f}x | {bound * 1e3:.2f} | {bound / m:.0%} | {errs[p]:.1e} |"
            )
        del paths, builders, W
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
