#!/usr/bin/env python3
"""Decode speed of qcli's checkpoints in vLLM's CPU build: bf16 vs W8A8 / FP8_DYNAMIC, with
lm_head dense and quantized, batch 1, greedy, ignore_eos.

    python benchmarks/decode_vllm.py --work /root/bench/decode \\
        --results benchmarks/results/decode-vllm            # 3 models x 5 schemes x 3 rounds
    python benchmarks/decode_vllm.py --models tiny --schemes bf16,W8A8+lm_head \\
        --rounds 1 --tokens 8 --work /tmp/decode            # smoke (test_bench.py)

Models: SmolLM2-135M-Instruct (real weights, tests/real_models.py), Llama-3.2-1B's and
Qwen2.5-0.5B's shapes (random weights, make_checkpoint.py presets; tied embeddings, 128k /
152k vocabularies), `tiny` (make_checkpoint's tiny-tied). Each scheme's checkpoint is made
once with `qcli quantize` and kept under WORK.

Every run is one process of vLLM's Python (--vllm-python, QCLI_VLLM_PYTHON, else the venv
scripts/vllm-conformance makes), which runs this file's `worker` role: load the checkpoint
(enforce_eager, bf16, one sequence, prefix caching off so every prompt is prefilled), one
untimed warm-up request, then one timed request of random prompt ids. Time to first token
and decode time come from vLLM's own request stats (first_token_latency; last_token_ts -
first_token_ts over the tokens after the first). Runs are interleaved, A B C D E A B C D E
..., and every ratio is taken against bf16 of the same round: other jobs share this
machine's cores.

A scheme whose decode is so slow that 128 tokens would take longer than --budget-s (vLLM's
int8 and fp8 paths on CPUs without VNNI / AMX) decodes fewer tokens, at least --min-tokens;
the table says how many. Round 1 also times each Linear and lm_head alone with a one-token
input inside the worker (the `breakdown`: where a decode step's time goes).

Bytes per token: every tensor of the checkpoint except the embedding table (one row of it is
read), plus, when the embeddings are tied and lm_head is dense, the table once more as
lm_head. KV-cache reads (under 0.5% here) are left out. Ideal speed-up = bf16 bytes / scheme
bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QCLI = [sys.executable, "-c", "from qcli.cli.app import run; run()"]
DEFAULT_VENV = "~/.cache/qcli-vllm-venv"
DTYPE = "bfloat16"  # vLLM's activation dtype, for every scheme

# scheme name -> `qcli quantize` options (None: the bf16 source itself)
SCHEMES: dict[str, list[str] | None] = {
    "bf16": None,
    "W8A8": ["--scheme", "W8A8"],
    "W8A8+lm_head": ["--scheme", "W8A8", "--lm-head"],
    "FP8_DYNAMIC": ["--scheme", "FP8_DYNAMIC"],
    "FP8_DYNAMIC+lm_head": ["--scheme", "FP8_DYNAMIC", "--lm-head"],
}
# model name -> ("real", smollm2) or ("preset", make_checkpoint preset)
MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("real", "smollm2"),
    "llama3.2-1b": ("preset", "llama3.2-1b"),
    "qwen2.5-0.5b": ("preset", "qwen2.5-0.5b"),
    "tiny": ("preset", "tiny-tied"),
}
DEFAULT_MODELS = ["smollm2-135m", "llama3.2-1b", "qwen2.5-0.5b"]
GOAL_MODEL = "llama3.2-1b"  # the 128k-vocabulary model the goal is stated for
GOAL = {"vs_bf16": 1.3, "vs_dense_head": 1.15}


# --------------------------------------------------------------------------------------
# worker: runs inside vLLM's venv (stdlib + vLLM + torch; never qcli)
# --------------------------------------------------------------------------------------


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(10, vocab - 1) for _ in range(n)]


def _request(llm, ids: list[int], tokens: int) -> dict[str, Any]:
    """One greedy request; TTFT and decode time from vLLM's request stats when it keeps
    them (disable_log_stats=False), else from the wall clock."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    out = llm.generate(TokensPrompt(prompt_token_ids=ids), sp, use_tqdm=False)[0]
    wall = time.perf_counter() - t0
    n = len(out.outputs[0].token_ids)
    m = out.metrics
    if m is not None and getattr(m, "first_token_ts", 0) and n > 1:
        ttft, decode = m.first_token_latency, m.last_token_ts - m.first_token_ts
        source = "vllm-stats"
    else:  # no stats: TTFT unknown, decode includes prefill
        ttft, decode, source = None, wall, "wall"
    return {
        "tokens": n,
        "wall_s": wall,
        "ttft_s": ttft,
        "decode_s": decode,
        "tok_s": (n - 1) / decode if decode > 0 and n > 1 else None,
        "timing": source,
    }


def _cpu_linear_path(mod) -> str | None:
    """Which dense GEMM vLLM's CPU dispatch bound (onednn_mm, sgl, or torch linear)."""
    fn = getattr(mod, "cpu_linear", None)
    names = getattr(getattr(fn, "__code__", None), "co_names", ())
    for key in ("onednn_mm", "weight_packed_linear_cpu", "zentorch_linear_unary", "linear"):
        if key in names:
            return key
    return None


def _kernel_label(mod) -> str:
    method = getattr(mod, "quant_method", None)
    scheme = getattr(mod, "scheme", None)
    if scheme is None:
        return f"{type(method).__name__} / {_cpu_linear_path(mod) or '?'}"
    kernel = next(
        (getattr(scheme, a) for a in ("kernel", "fp8_linear") if getattr(scheme, a, None)),
        None,
    )
    path = getattr(getattr(kernel, "linear_method", None), "__name__", None)
    label = f"{type(scheme).__name__} / {type(kernel).__name__}"
    return f"{label} ({path})" if path else label


def _layers_in_order(model) -> list[tuple[str, Any, bool]]:
    """Every Linear and lm_head (flagged True), in model order."""
    found = []
    for name, mod in model.named_modules():
        mro = [c.__name__ for c in type(mod).__mro__]
        if "ParallelLMHead" in mro:
            found.append((name, mod, True))
        elif "LinearBase" in mro:
            found.append((name, mod, False))
    return found


def probe_kernels(model) -> dict[str, Any]:
    """Runs in vLLM's worker (apply_model): the kernel of every Linear and of lm_head."""
    import torch

    linear, head = set(), None
    for _, mod, is_head in _layers_in_order(model):
        if is_head:
            head = _kernel_label(mod)
        else:
            linear.add(_kernel_label(mod))
    return {"linear": sorted(linear), "lm_head": head, "threads": torch.get_num_threads()}


def _group(name: str) -> str:
    for g in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        if name.endswith(g):
            return g
    return "other_linear"


def breakdown(model, reps: int) -> dict[str, Any]:
    """Runs in vLLM's worker: each Linear and lm_head called alone on one token, in model
    order (so weights stream from memory as in a decode step), median of `reps` passes;
    milliseconds per token by group."""
    import torch

    layers = _layers_in_order(model)
    times: dict[str, list[float]] = {name: [] for name, _, _ in layers}
    dtype = getattr(torch, DTYPE)  # apply_model runs outside vLLM's default-dtype scope
    with torch.no_grad():
        for _ in range(reps):
            for name, mod, is_head in layers:
                k = mod.embedding_dim if is_head else mod.input_size
                x = torch.randn(1, k).to(dtype)
                t0 = time.perf_counter()
                _ = mod.quant_method.apply(mod, x) if is_head else mod(x)
                times[name].append(time.perf_counter() - t0)
    groups: dict[str, float] = {}
    for name, _, is_head in layers:
        g = "lm_head" if is_head else _group(name)
        groups[g] = groups.get(g, 0.0) + 1e3 * statistics.median(times[name])
    return {"reps": reps, "ms": {g: round(v, 3) for g, v in groups.items()}}


def _profile(llm, vocab: int, top: int = 12) -> list[dict[str, Any]]:
    """torch.profiler over two one-token forwards (a 1-token prompt, 2 new tokens): the ops
    that take the time, self CPU ms per forward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        _request(llm, _prompt(vocab, 1, 99), 2)
    rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "self_ms": round(e.self_cpu_time_total / 2e3, 3), "calls": e.count // 2}
        for e in rows[:top]
    ]


def _decode_tokens(est_s: float, a) -> int:
    """--tokens, or fewer where they would take longer than --budget-s (never below
    --min-tokens)."""
    if est_s <= 0 or est_s * (a.tokens - 1) <= a.budget_s:
        return a.tokens
    return max(a.min_tokens, min(a.tokens, 1 + int(a.budget_s / est_s)))


def worker(a) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    reply, sys.stdout = sys.stdout, sys.stderr  # vLLM's chatter must not mix with the reply
    vocab = json.loads((Path(a.checkpoint) / "config.json").read_text())["vocab_size"]
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM

    llm = LLM(
        a.checkpoint,
        dtype=DTYPE,
        enforce_eager=True,
        distributed_executor_backend="uni",
        max_model_len=a.prompt_len + a.tokens + 8,
        max_num_seqs=1,
        skip_tokenizer_init=True,  # synthetic checkpoints have no tokenizer: ids go in
        enable_prefix_caching=False,  # every request pays its own prefill
        disable_log_stats=False,  # keeps the per-request timestamps
        seed=0,
    )
    res: dict[str, Any] = {"vllm": vllm.__version__, "load_s": time.perf_counter() - t0}
    res.update(llm.apply_model(probe_kernels)[0])
    warm = _request(llm, _prompt(vocab, a.prompt_len, 10_000 + a.seed), a.warmup_tokens)
    est = warm["decode_s"] / max(1, warm["tokens"] - 1)
    res["warmup"] = warm
    res["run"] = _request(llm, _prompt(vocab, a.prompt_len, a.seed), _decode_tokens(est, a))
    if a.breakdown:
        reps = max(1, min(5, int(a.budget_s / 4 / max(est, 1e-3))))
        res["breakdown"] = llm.apply_model(lambda m: breakdown(m, reps))[0]
    if a.profile:
        res["profile"] = _profile(llm, vocab)
    res["loadavg"] = os.getloadavg()
    print(json.dumps(res), file=reply, flush=True)
    return 0


# --------------------------------------------------------------------------------------
# driver: runs in qcli's venv
# --------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[decode_vllm] {msg}", file=sys.stderr, flush=True)


def vllm_python(given: str | None) -> str | None:
    """--vllm-python, QCLI_VLLM_PYTHON, else the venv of scripts/vllm-conformance; None
    when that Python is missing or has no vLLM."""
    python = given or os.environ.get("QCLI_VLLM_PYTHON")
    if not python:
        venv = Path(os.environ.get("QCLI_VLLM_VENV", DEFAULT_VENV)).expanduser()
        python = str(venv / "bin" / "python")
    if not Path(python).is_file():
        return None
    probe = [python, "-c", "import importlib.util as u, sys; sys.exit(not u.find_spec('vllm'))"]
    return python if subprocess.run(probe, capture_output=True).returncode == 0 else None


def source_checkpoint(model: str, work: Path) -> Path:
    """The bf16 checkpoint: SmolLM2 from tests/real_models.py, or a make_checkpoint preset
    written once under WORK."""
    kind, what = MODELS[model]
    if kind == "real":
        sys.path.insert(0, str(REPO))
        from tests.real_models import smollm2

        return smollm2(skip=False)
    out = work / "src" / what
    if not (out / "config.json").is_file():
        sys.path.insert(0, str(HERE))
        import make_checkpoint

        log(f"writing {what} to {out}")
        if make_checkpoint.main(["--preset", what, str(out), "--force"]) != 0:
            raise SystemExit(f"make_checkpoint --preset {what} failed")
    return out


def quantized(src: Path, model: str, scheme: str, work: Path, rebuild: bool) -> Path:
    """`qcli quantize SRC OUT ...` once; a stamp with the command line says OUT is done."""
    opts = SCHEMES[scheme]
    if opts is None:
        return src
    out = work / model / scheme
    cmd = [*QCLI, "quantize", str(src), str(out), *opts, "--overwrite", "--quiet"]
    stamp = out / ".decode_vllm-done"
    if not rebuild and stamp.is_file() and stamp.read_text() == json.dumps(cmd[3:]):
        return out
    log(f"qcli quantize {model} {scheme}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"qcli quantize {src} {' '.join(opts)}: exit {r.returncode}\n{r.stderr}")
    stamp.write_text(json.dumps(cmd[3:]))
    return out


def _headers(ckpt: Path) -> dict[str, dict]:
    tensors: dict[str, dict] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            tensors.update(json.loads(fh.read(n)))
    tensors.pop("__metadata__", None)
    return tensors


def _nbytes(meta: dict) -> int:
    return meta["data_offsets"][1] - meta["data_offsets"][0]


def bytes_per_token(ckpt: Path) -> dict[str, int]:
    """Weight bytes one decode step reads: all but the embedding table (one row of it), and
    lm_head: its own tensors, or the table itself when tied and dense."""
    tensors = _headers(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    embed = tensors["model.embed_tokens.weight"]
    head = sum(_nbytes(m) for k, m in tensors.items() if k.startswith("lm_head."))
    if not head:  # tied: vLLM's lm_head is the embedding table
        head = _nbytes(embed)
    row = _nbytes(embed) // config["vocab_size"]
    body = sum(
        _nbytes(m)
        for k, m in tensors.items()
        if not k.startswith("lm_head.") and k != "model.embed_tokens.weight"
    )
    total = body + head + row
    return {"total": total, "lm_head": head, "body": body + row}


def run_one(python: str, ckpt: Path, args, seed: int, extra: list[str], logf: Path) -> dict:
    """One vLLM process on one checkpoint; its JSON reply, or {"error": ...}."""
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "worker",
        str(ckpt),
        "--tokens",
        str(args.tokens),
        "--min-tokens",
        str(args.min_tokens),
        "--warmup-tokens",
        str(args.warmup_tokens),
        "--prompt-len",
        str(args.prompt_len),
        "--budget-s",
        str(args.budget_s),
        "--seed",
        str(seed),
        *extra,
    ]  # fmt: skip
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # engine and model in this one process
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # apply_model's functions
        VLLM_CPU_OMP_THREADS_BIND=args.bind,
    )
    t0 = time.perf_counter()
    with open(logf, "w") as lf:
        try:
            p = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=lf, text=True, env=env, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {args.timeout} s (log {logf})"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = logf.read_text()[-1500:]
        return {"error": f"exit {p.returncode} (log {logf}): {tail}"}
    res = json.loads(lines[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _per_round(runs: list[dict], num: str, den: str, key: str = "tok_s") -> list[float]:
    """num / den within each round (the fair comparison on a shared machine)."""
    out = []
    for r in sorted({x["round"] for x in runs}):
        a = [x for x in runs if x["round"] == r and x["scheme"] == num and x.get(key)]
        b = [x for x in runs if x["round"] == r and x["scheme"] == den and x.get(key)]
        if a and b:
            out.append(a[0][key] / b[0][key])
    return out


def summarize(model: str, runs: list[dict], nbytes: dict[str, dict]) -> list[dict]:
    rows = []
    base = nbytes["bf16"]["total"] if "bf16" in nbytes else None
    for scheme in [s for s in SCHEMES if s in nbytes]:
        mine = [x for x in runs if x["scheme"] == scheme and x.get("tok_s")]
        tok = [x["tok_s"] for x in mine]
        b = nbytes[scheme]
        ratio = _median(_per_round(runs, scheme, "bf16")) if base else None
        ideal = base / b["total"] if base else None
        dense = scheme.removesuffix("+lm_head")
        rows.append(
            {
                "model": model,
                "scheme": scheme,
                "runs": len(mine),
                "tokens": sorted({x["tokens"] for x in mine}),
                "tok_s_median": _median(tok),
                "tok_s_min": min(tok) if tok else None,
                "tok_s_max": max(tok) if tok else None,
                "vs_bf16": ratio,
                "vs_dense_head": (
                    _median(_per_round(runs, scheme, dense)) if dense != scheme else None
                ),
                "ttft_s_median": _median([x["ttft_s"] for x in mine]),
                "ttft_s_min": min((x["ttft_s"] for x in mine if x["ttft_s"]), default=None),
                "bytes_per_token": b["total"],
                "lm_head_share": b["lm_head"] / b["total"],
                "ideal_speedup": ideal,
                "of_ideal": ratio / ideal if ratio and ideal else None,
                "kernels": mine[0]["kernels"] if mine else None,
                "breakdown_ms": next((x["breakdown"] for x in mine if x.get("breakdown")), None),
            }
        )
    return rows


def goal_verdict(rows: list[dict]) -> dict | None:
    by = {r["scheme"]: r for r in rows if r["model"] == GOAL_MODEL}
    lm = by.get("W8A8+lm_head")
    if not lm or lm["vs_bf16"] is None:
        return None
    v = {
        "model": GOAL_MODEL,
        "w8a8_lm_head_vs_bf16": lm["vs_bf16"],
        "w8a8_lm_head_vs_w8a8": lm["vs_dense_head"],
    }
    v["met"] = bool(
        lm["vs_bf16"] >= GOAL["vs_bf16"]
        and lm["vs_dense_head"] is not None
        and lm["vs_dense_head"] >= GOAL["vs_dense_head"]
    )
    return v


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _breakdown_cell(r: dict) -> str:
    b = r.get("breakdown_ms")
    if not b:
        return "–"
    ms = b["ms"]
    step = 1e3 / r["tok_s_median"] if r["tok_s_median"] else None
    body = sum(v for k, v in ms.items() if k != "lm_head")
    head = ms.get("lm_head", 0.0)
    rest = step - body - head if step else None
    return f"{head:.1f} / {body:.1f} / {_fmt(rest, '.1f')}"


def markdown(result: dict) -> str:
    lines = [
        f"# decode in vLLM {result['vllm']} (CPU), batch 1, greedy",
        "",
        f"{result['cpu']}, {result['threads']} threads; prompt {result['prompt_len']} random "
        f"ids; {result['rounds']} rounds, interleaved; load average "
        f"{result['loadavg_min']:.1f}-{result['loadavg_max']:.1f} during the runs.",
        "",
        "| model | scheme | tokens | tok/s median (min-max) | x bf16 | x dense head "
        "| TTFT s | MB/token | lm_head share | ideal x | of ideal "
        "| lm_head / linears / rest ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['scheme']} | {','.join(map(str, r['tokens']))} "
            f"| {_fmt(r['tok_s_median'], '.2f')} ({_fmt(r['tok_s_min'], '.2f')}-"
            f"{_fmt(r['tok_s_max'], '.2f')}) | {_fmt(r['vs_bf16'], '.2f')} "
            f"| {_fmt(r['vs_dense_head'], '.2f')} | {_fmt(r['ttft_s_median'], '.2f')} "
            f"| {r['bytes_per_token'] / 1e6:.0f} | {r['lm_head_share']:.0%} "
            f"| {_fmt(r['ideal_speedup'], '.2f')} | {_fmt(r['of_ideal'], '.0%')} "
            f"| {_breakdown_cell(r)} |"
        )
    lines += ["", "Kernels vLLM picked:", ""]
    seen = set()
    for r in result["rows"]:
        k = json.dumps(r["kernels"], sort_keys=True)
        if r["kernels"] and (r["scheme"], k) not in seen:
            seen.add((r["scheme"], k))
            lines.append(
                f"- {r['scheme']} ({r['model']}): linear {', '.join(r['kernels']['linear'])}; "
                f"lm_head {r['kernels']['lm_head']}"
            )
    g = result.get("goal")
    if g:
        lines += [
            "",
            f"Goal on {g['model']}: W8A8+lm_head {g['w8a8_lm_head_vs_bf16']:.2f}x bf16 "
            f"(goal {GOAL['vs_bf16']}x), {_fmt(g['w8a8_lm_head_vs_w8a8'], '.2f')}x W8A8 "
            f"(goal {GOAL['vs_dense_head']}x): **{'met' if g['met'] else 'not met'}**.",
        ]
    lines += _profile_lines(result["runs"])
    if result["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def _profile_lines(runs: list[dict], top: int = 8) -> list[str]:
    out = []
    for x in runs:
        if x.get("profile"):
            ops = ", ".join(f"{p['op']} {p['self_ms']:.1f}" for p in x["profile"][:top])
            out.append(f"- {x['model']} {x['scheme']}: {ops}")
    if not out:
        return []
    return ["", "torch.profiler, self CPU ms per one-token forward (top ops):", "", *out]


def _cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _git_commit() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    return r.stdout.decode().strip() or None


def prepare(args) -> tuple[dict, dict]:
    """Every (model, scheme) checkpoint, made before any timing, and its bytes per token."""
    ckpts: dict[str, dict[str, Path]] = {}
    nbytes: dict[str, dict[str, dict]] = {}
    for model in args.models:
        src = source_checkpoint(model, args.work)
        ckpts[model] = {s: quantized(src, model, s, args.work, args.rebuild) for s in args.schemes}
        nbytes[model] = {s: bytes_per_token(p) for s, p in ckpts[model].items()}
    return ckpts, nbytes


def measure(args, python: str, ckpts: dict) -> tuple[list[dict], list[str]]:
    """rounds x models x schemes, interleaved; one process per run."""
    runs, errors = [], []
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for rnd in range(args.rounds):
        for model in args.models:
            for scheme in args.schemes:
                extra = ["--breakdown"] if rnd == 0 and not args.no_breakdown else []
                extra += ["--profile"] if rnd == 0 and args.profile else []
                logf = logs / f"{model}-{scheme}-r{rnd + 1}.log"
                res = run_one(python, ckpts[model][scheme], args, rnd + 1, extra, logf)
                if "error" in res:
                    errors.append(f"{model} {scheme} round {rnd + 1}: {res['error'][:600]}")
                    log(errors[-1])
                    continue
                runs.append(_run_row(model, scheme, rnd + 1, res))
                log(_run_line(runs[-1]))
    return runs, errors


def _run_row(model: str, scheme: str, rnd: int, res: dict) -> dict:
    run = res["run"]
    return {
        "model": model,
        "scheme": scheme,
        "round": rnd,
        **{k: run[k] for k in ("tokens", "tok_s", "ttft_s", "decode_s", "wall_s", "timing")},
        "load_s": res["load_s"],
        "process_s": res["process_s"],
        "threads": res["threads"],
        "kernels": {"linear": res["linear"], "lm_head": res["lm_head"]},
        "warmup": res["warmup"],
        "breakdown": res.get("breakdown"),
        "profile": res.get("profile"),
        "loadavg": res["loadavg"],
        "vllm": res["vllm"],
    }


def _run_line(x: dict) -> str:
    return (
        f"round {x['round']} {x['model']} {x['scheme']}: {_fmt(x['tok_s'], '.2f')} tok/s "
        f"({x['tokens']} tokens), TTFT {_fmt(x['ttft_s'], '.2f')} s, load {x['loadavg'][0]:.1f}"
    )


def _of(runs: list[dict], model: str) -> list[dict]:
    return [x for x in runs if x["model"] == model]


def driver(args) -> int:
    python = vllm_python(args.vllm_python)
    if python is None:
        log("no Python with vLLM (--vllm-python, QCLI_VLLM_PYTHON, or run")
        log("scripts/vllm-conformance --setup-only)")
        return 3
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpts, nbytes = prepare(args)
    runs, errors = measure(args, python, ckpts)
    rows = [r for m in args.models for r in summarize(m, _of(runs, m), nbytes[m])]
    loads = [x["loadavg"][0] for x in runs] or [0.0]
    result = {
        "command": " ".join(["python", "benchmarks/decode_vllm.py", *args.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _git_commit(),
        "cpu": _cpu_name(),
        "threads": runs[0]["threads"] if runs else None,
        "vllm": runs[0]["vllm"] if runs else None,
        "vllm_python": python,
        "prompt_len": args.prompt_len,
        "tokens": args.tokens,
        "budget_s": args.budget_s,
        "rounds": args.rounds,
        "loadavg_min": min(loads),
        "loadavg_max": max(loads),
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
        "goal": goal_verdict(rows),
        "errors": errors,
        "runs": runs,
    }
    md = markdown(result)
    print(md)
    if args.results:
        stem = Path(args.results)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(md)
    return 0 if runs and not errors else 1


def _csv(choices: dict) -> Any:
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items

    return parse


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--min-tokens", type=int, default=2, help="fewest, for slow schemes")
    ap.add_argument("--warmup-tokens", type=int, default=2, help="untimed request, >= 2")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--budget-s", type=float, default=30.0, help="decode seconds per run before cutting"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        ap = argparse.ArgumentParser(prog="decode_vllm.py worker")
        ap.add_argument("role")
        ap.add_argument("checkpoint")
        _common(ap)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--breakdown", action="store_true")
        ap.add_argument("--profile", action="store_true")
        return ap.parse_args(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=_csv(MODELS), default=DEFAULT_MODELS)
    ap.add_argument("--schemes", type=_csv(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--rounds", type=int, default=3)
    _common(ap)
    ap.add_argument("--work", type=Path, default=Path("/root/bench/decode"))
    ap.add_argument("--results", help="write RESULTS.json and RESULTS.md")
    ap.add_argument("--vllm-python", help="Python with vLLM (default: QCLI_VLLM_PYTHON, venv)")
    ap.add_argument(
        "--bind",
        default=f"0-{(os.cpu_count() or 1) - 1}",
        help="VLLM_CPU_OMP_THREADS_BIND (default: every core)",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--rebuild", action="store_true", help="quantize again")
    ap.add_argument("--no-breakdown", action="store_true", help="skip round 1's breakdown")
    ap.add_argument("--profile", action="store_true", help="torch.profiler top ops, round 1")
    a = ap.parse_args(argv)
    a.role, a.argv = "driver", argv
    if "bf16" not in a.schemes:
        ap.error("--schemes needs bf16 (every ratio is to it)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    return worker(a) if a.role == "worker" else driver(a)


if __name__ == "__main__":
    sys.exit(main())
