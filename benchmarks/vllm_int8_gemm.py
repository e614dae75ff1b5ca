#!/usr/bin/env python3
"""Where W8A8 decode time goes in vLLM's CPU build: its oneDNN int8 GEMM alone, one token,
against bf16 F.linear on the same shapes, with the oneDNN implementation it ran.

Runs in vLLM's venv (the one scripts/vllm-conformance makes):

    ~/.cache/qcli-vllm-venv/bin/python benchmarks/vllm_int8_gemm.py \\
        [--json benchmarks/results/vllm-int8-gemm.json]

Each shape (K = input, N = output features; Llama-3.2-1B's layers and a 32k slice of its
lm_head) runs vLLM's own W8A8 path as CPUInt8ScaledMMLinearKernel calls it on a CPU without
AMX: `onednn_scaled_int8_quant` (per-token dynamic int8) then `onednn_scaled_mm` through a
handler made once by `create_onednn_scaled_mm` (weight handed over at load time). Against:
bf16 `F.linear`, the dense path vLLM takes. Median of --reps calls after one warm-up; the
weight rotates over copies so each call reads it from memory, as in decoding. The oneDNN
verbose line of one call names the implementation (`brg:avx512_core_vnni`, `gemm:jit`, ...)
and the weight layout it was given (`ab` = plain, as stored; a blocked tag = prepacked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048), (2048, 32768)]
NAMES = {
    (2048, 3072): "qkv_proj",
    (2048, 2048): "o_proj",
    (2048, 16384): "gate_up_proj",
    (8192, 2048): "down_proj",
    (2048, 32768): "lm_head (1/4 of 128256)",
}


def _median_ms(fn, copies: int, reps: int) -> float:
    fn(0)
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r % copies)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(k: int, n: int, reps: int, rotate_mb: int) -> dict:
    import torch
    import vllm._custom_ops as ops

    copies = max(2, rotate_mb * 2**20 // (k * n))  # int8 bytes per copy
    g = torch.Generator().manual_seed(k * 7 + n)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    handlers, dense = [], []
    for _ in range(copies):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, 1, generator=g) / 100
        handlers.append(ops.create_onednn_scaled_mm(w.t(), s, torch.bfloat16, True, False, 32))
        dense.append(torch.randn(n, k, generator=g).to(torch.bfloat16))

    def int8(i: int) -> None:
        xq, xs, xz = ops.onednn_scaled_int8_quant(x, None, None, True)
        out = torch.empty((1, n), dtype=torch.bfloat16)
        ops.onednn_scaled_mm(handlers[i], xq, out, xs, xz, None, None)

    def bf16(i: int) -> None:
        torch.nn.functional.linear(x, dense[i])

    ms_int8 = _median_ms(int8, copies, reps)
    ms_bf16 = _median_ms(bf16, copies, reps)
    return {
        "layer": NAMES.get((k, n), ""),
        "k": k,
        "n": n,
        "int8_ms": ms_int8,
        "bf16_ms": ms_bf16,
        "int8_vs_bf16": ms_bf16 / ms_int8,
        "int8_gb_s": k * n / ms_int8 / 1e6,
        "bf16_gb_s": 2 * k * n / ms_bf16 / 1e6,
    }


def onednn_impl(k: int, n: int) -> str:
    """The oneDNN verbose line of one int8 matmul of this shape (a child process: the
    verbose level is read once, at oneDNN's first call)."""
    code = (
        "import torch, vllm._custom_ops as ops\n"
        f"w = torch.randint(-127, 128, ({n}, {k}), dtype=torch.int8)\n"
        f"h = ops.create_onednn_scaled_mm(w.t(), torch.rand({n}, 1) / 100, torch.bfloat16,"
        " True, False, 32)\n"
        f"x = torch.randn(1, {k}).to(torch.bfloat16)\n"
        "xq, xs, xz = ops.onednn_scaled_int8_quant(x, None, None, True)\n"
        f"ops.onednn_scaled_mm(h, xq, torch.empty(1, {n}, dtype=torch.bfloat16), xs, xz,"
        " None, None)\n"
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ",exec," in ln and ",matmul," in ln]
    if not lines:
        return "?"
    f = lines[-1].split(",")
    return f"{f[6]} ({f[8]})"  # implementation, memory descriptors


def cpu_flags() -> list[str]:
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
    try:
        flags = next(
            ln for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return []
    return [f for f in want if f in flags]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rotate-mb", type=int, default=512, help="weight bytes cycled over")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for k, n in SHAPES:
        r = measure(k, n, a.reps, a.rotate_mb)
        r["onednn"] = onednn_impl(k, n)
        rows.append(r)
    flags = cpu_flags()
    print(f"CPU flags: {' '.join(flags)}; {torch.get_num_threads()} threads\n")
    print("| layer | K x N | int8 ms | bf16 ms | int8 x bf16 | int8 GB/s | bf16 GB/s | oneDNN |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['k']}x{r['n']} | {r['int8_ms']:.2f} | {r['bf16_ms']:.2f} "
            f"| {r['int8_vs_bf16']:.2f} | {r['int8_gb_s']:.2f} | {r['bf16_gb_s']:.2f} "
            f"| {r['onednn']} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu_flags": flags, "threads": torch.get_num_threads(), "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
