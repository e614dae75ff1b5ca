#!/usr/bin/env python3
"""vLLM conformance suite: does vLLM's CPU build load qcli's checkpoints and
compute what transformers computes from them?

One file, three roles (each imports only what it needs):

  drive      (system python, qcli + transformers + compressed-tensors installed)
             makes tiny seeded models, quantizes them with `qcli quantize`, runs
             the `vllm-run` role in the vLLM venv, runs transformers on the same
             checkpoints, compares, prints a table, exits non-zero on failure
             naming the checkpoint and the layer.
  vllm-run   (inside the vLLM venv) loads each checkpoint with vllm.LLM in this
             one process, one after the other, records every layer's quant
             method / compressed-tensors scheme / kernel, greedy tokens and
             log-probabilities, and writes one JSON file per checkpoint.
  gemm-probe (inside the vLLM venv) measures vLLM's oneDNN int8 GEMM against
             exact integer arithmetic for full-range (+-127) and +-63 weights.

Normally started through scripts/vllm-conformance, which creates or reuses the
venv. See `python scripts/vllm_conformance.py drive --help`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

# --------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------

VOCAB = 512
# vLLM's CPU attention accepts head sizes 32, 64, 80, 96, 112, 128, ...
MODELS: dict[str, dict] = {
    # untied Llama, head size 32, grouped-query attention
    "llama-untied": dict(
        arch="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        tie_word_embeddings=False,
    ),
    # tied Llama, head size 64
    "llama-tied": dict(
        arch="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        tie_word_embeddings=True,
    ),
    # tied Qwen2 (q/k/v carry biases), head size 64
    "qwen2-tied": dict(
        arch="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    ),
    # Phi-3: fused layer names on disk (qkv_proj, gate_up_proj), head size 32
    "phi3-fused": dict(
        arch="phi3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ),
}

# scheme -> the compressed-tensors scheme class vLLM must pick for it
SCHEMES: dict[str, str] = {
    "W8A8": "CompressedTensorsW8A8Int8",
    "FP8_DYNAMIC": "CompressedTensorsW8A8Fp8",
    "W8A16": "CompressedTensorsWNA16",
    "FP8": "CompressedTensorsW8A16Fp8",
}
# Schemes every model runs with and without --lm-head; they must load.
REQUIRED_SCHEMES = ("W8A8", "FP8_DYNAMIC")
# Schemes vLLM 0.32's CPU build has no kernel for (see README / the suite's
# output). They are still tried once on one model: the row records vLLM's
# answer, and if a later vLLM loads them they get the full checks.
PROBE_SCHEMES = ("W8A16", "FP8")
PROBE_MODEL = "llama-untied"
# The checkpoint the saturation experiment runs on (and its +-63 variant).
SAT_CKPT = "llama-untied-W8A8-lm"

SEED = 0
N_PROMPTS = 2
PROMPT_LEN = 16
N_GEN = 16
TOPK = 5
INIT_RANGE = 0.1  # larger than the 0.02 default: peakier logits, fewer near-ties

# Tolerances on |logprob_vllm - logprob_transformers| (natural log), for every
# prompt and generated position and every token of vLLM's top-k there.
# Both sides run float32; what is left is each side's own arithmetic
# (oneDNN/blocked fp32 GEMMs vs torch, activation rounding ties, fp8 casts).
# The values are about 10x the largest difference the suite measured on
# exact kernels and well under the quantization's own effect (the "q-effect"
# column: transformers quantized vs transformers dense), so a checkpoint read
# differently (a scale misapplied, a layer left dense) cannot pass.
LP_TOL = {"dense": 2e-3, "W8A8": 2e-2, "FP8_DYNAMIC": 2e-2, "W8A16": 2e-2, "FP8": 2e-2}
# On a CPU whose oneDNN int8 GEMM saturates (no VNNI: AVX2 or AVX-512 without
# VNNI), int8 x int8 products are summed in pairs into int16 (vpmaddubsw) and
# clip; a full-range W8A8 checkpoint then computes visibly different numbers.
# The suite detects that with a GEMM probe, says so in every affected row, and
# checks W8A8 there against this looser bound, which the saturation experiment
# (forced with ONEDNN_MAX_CPU_ISA=AVX2 on any machine) shows is the size of
# the effect on these models.
LP_TOL_SATURATING = 1.0


def ckpt_name(model: str, scheme: str, lm_head: bool) -> str:
    return f"{model}-{scheme}" + ("-lm" if lm_head else "")


def matrix() -> list[dict]:
    rows = []
    for m in MODELS:
        rows.append(dict(name=f"{m}-dense", model=m, scheme="dense", lm_head=False))
        for s in REQUIRED_SCHEMES:
            for lm in (False, True):
                rows.append(dict(name=ckpt_name(m, s, lm), model=m, scheme=s, lm_head=lm))
    for s in PROBE_SCHEMES:
        rows.append(dict(name=ckpt_name(PROBE_MODEL, s, False), model=PROBE_MODEL,
                         scheme=s, lm_head=False, probe=True))
    return rows


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(SEED)
    return [[rng.randrange(1, VOCAB) for _ in range(PROMPT_LEN)] for _ in range(N_PROMPTS)]


# --------------------------------------------------------------------------
# vllm-run: inside the vLLM venv
# --------------------------------------------------------------------------


def _kernel_of(scheme):
    for attr in ("kernel", "fp8_linear", "linear_kernel"):
        k = getattr(scheme, attr, None)
        if k is not None:
            return k
    return None


def inspect_layers(model) -> dict:
    """Runs inside the vLLM worker (llm.apply_model): every Linear and lm_head
    with its quant method, compressed-tensors scheme and kernel."""
    out = {}
    for name, mod in model.named_modules():
        mro = [c.__name__ for c in type(mod).__mro__]
        if "LinearBase" in mro:
            kind = "linear"
        elif "ParallelLMHead" in mro:
            kind = "lm_head"
        else:
            continue
        qm = getattr(mod, "quant_method", None)
        scheme = getattr(mod, "scheme", None)
        kernel = _kernel_of(scheme) if scheme is not None else None
        path = getattr(kernel, "linear_method", None)
        w = getattr(mod, "weight", None)
        out[name] = dict(
            kind=kind,
            module=type(mod).__name__,
            quant_method=type(qm).__name__ if qm is not None else None,
            scheme=type(scheme).__name__ if scheme is not None else None,
            kernel=type(kernel).__name__ if kernel is not None else None,
            kernel_path=getattr(path, "__name__", None),
            weight_dtype=str(w.dtype) if w is not None else None,
        )
    return out


def gemm_probe() -> dict:
    """vLLM's oneDNN W8A8 GEMM (the CPUInt8ScaledMMLinearKernel path) against
    exact integer arithmetic; max error as a fraction of max |output|."""
    import torch
    from vllm import _custom_ops as ops

    res = {}
    gen = torch.Generator().manual_seed(SEED)
    for k in (128, 512, 4096):
        for qmax in (127, 63):
            n, m = 256, 8
            w = torch.randn(n, k, generator=gen)
            s = w.abs().amax(1, keepdim=True) / qmax
            q = torch.clamp(torch.round(w / s), -qmax, qmax).to(torch.int8)
            h = ops.create_onednn_scaled_mm(q.t(), s.view(-1), torch.float32, True, False, 32)
            x = torch.randn(m, k, generator=gen)
            xq, xs, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
            out = torch.empty(m, n, dtype=torch.float32)
            ops.onednn_scaled_mm(h, xq, out, xs, None, None, None)
            ref = (xq.double() @ q.double().t()) * xs.double().view(-1, 1) * s.double().view(1, -1)
            err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
            res[f"K{k}_q{qmax}"] = err
    res["saturates"] = any(v > 1e-4 for key, v in res.items() if key.endswith("q127"))
    res["isa_cap"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    return res


def _lp_dict(d) -> dict:
    return {str(t): float(v.logprob) for t, v in d.items()}


def vllm_run(args) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    jobs = json.loads(Path(args.jobs).read_text())
    outdir = Path(args.results)
    outdir.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    import vllm
    from vllm import LLM, SamplingParams

    import_s = time.time() - t0
    probe = gemm_probe()
    (outdir / "_probe.json").write_text(json.dumps(
        dict(probe, vllm=vllm.__version__, import_s=import_s), indent=1))

    sp = SamplingParams(temperature=0.0, max_tokens=N_GEN, logprobs=TOPK,
                        prompt_logprobs=TOPK, ignore_eos=True, detokenize=False, seed=SEED)
    for job in jobs["checkpoints"]:
        name = job["name"]
        (outdir / f"{name}.started").write_text("")
        res = dict(name=name, path=job["path"], load_error=None, gen_error=None)
        t = time.time()
        llm = None
        try:
            llm = LLM(model=job["path"], enforce_eager=True, distributed_executor_backend="uni",
                      max_model_len=128, skip_tokenizer_init=True, dtype=jobs["dtype"],
                      seed=SEED, max_num_seqs=N_PROMPTS)
        except Exception as e:  # noqa: BLE001 - recorded, judged by the driver
            res["load_error"] = f"{type(e).__name__}: {e}"
            res["load_traceback"] = traceback.format_exc()[-4000:]
        res["load_s"] = round(time.time() - t, 1)
        if llm is not None:
            try:
                res["layers"] = llm.apply_model(inspect_layers)[0]
                t = time.time()
                outs = llm.generate([{"prompt_token_ids": p} for p in jobs["prompts"]], sp,
                                    use_tqdm=False)
                res["gen_s"] = round(time.time() - t, 2)
                res["seqs"] = [
                    dict(
                        prompt=list(o.prompt_token_ids),
                        gen=list(o.outputs[0].token_ids),
                        gen_lp=[_lp_dict(d) for d in o.outputs[0].logprobs],
                        prompt_lp=[None if d is None else _lp_dict(d) for d in o.prompt_logprobs],
                    )
                    for o in outs
                ]
            except Exception as e:  # noqa: BLE001
                res["gen_error"] = f"{type(e).__name__}: {e}"
                res["gen_traceback"] = traceback.format_exc()[-4000:]
        (outdir / f"{name}.json").write_text(json.dumps(res))
        del llm
        gc.collect()
    return 0


def gemm_probe_main(args) -> int:
    print(json.dumps(gemm_probe(), indent=1))
    return 0


# --------------------------------------------------------------------------
# drive: system python
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def make_model(name: str, dest: Path) -> None:
    """A tiny seeded random model, saved in bfloat16 with transformers."""
    import torch
    import transformers

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    common = dict(vocab_size=VOCAB, max_position_embeddings=256, initializer_range=INIT_RANGE,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "phi3": transformers.Phi3Config}[arch]
    cfg = cfg_cls(**common, **spec)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norm weights, so a wrongly loaded norm shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = model.to(torch.bfloat16)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "qcli-suite-spec.json").write_text(json.dumps(_model_key(name)))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _model_key(name: str) -> dict:
    import transformers

    return dict(spec=MODELS[name], seed=SEED, init=INIT_RANGE, vocab=VOCAB,
                transformers=transformers.__version__)


def model_is_current(name: str, dest: Path) -> bool:
    f = dest / "qcli-suite-spec.json"
    return f.exists() and json.loads(f.read_text()) == _model_key(name)


def qcli_cmd() -> list[str]:
    env = os.environ.get("QCLI")
    if env:
        return shlex.split(env)
    exe = shutil.which("qcli")
    if exe:
        return [exe]
    return [sys.executable, "-m", "qcli.cli"]


def quantize(src: Path, out: Path, scheme: str, lm_head: bool) -> None:
    cmd = qcli_cmd() + ["quantize", str(src), str(out), "--scheme", scheme, "--overwrite",
                        "--quiet"]
    if lm_head:
        cmd.append("--lm-head")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")


def make_q63_variant(src_model: Path, ckpt: Path, dest: Path) -> None:
    """Copy a W8A8 checkpoint with every int8 weight re-quantized from the
    source weights to +-63 (scale = absmax / 63): what a 'safe range' option
    would write. Used only by the saturation experiment."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = {}
    for f in src_model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                src[k] = h.get_tensor(k)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    for f in tmp.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            t = {k: h.get_tensor(k) for k in h.keys()}
        for k in list(t):
            if t[k].dtype == torch.int8 and k.endswith(".weight"):
                base = k[: -len(".weight")]
                w = src.get(k)
                if w is None and base == "lm_head":
                    w = src["model.embed_tokens.weight"]
                w = w.float()
                sdt = t[base + ".weight_scale"].dtype
                s = (w.abs().amax(1, keepdim=True) / 63).clamp(min=1e-12).to(sdt)
                t[k] = torch.clamp(torch.round(w / s.float()), -63, 63).to(torch.int8)
                t[base + ".weight_scale"] = s
        save_file(t, str(f), metadata={"format": "pt"})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def hf_logprobs(path: Path, seqs: list[list[int]]) -> list:
    """transformers on the checkpoint, float32, teacher-forced on `seqs`:
    log_softmax at every position (positions 0..L-2 predict tokens 1..L-1)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            logits = model(torch.tensor([s])).logits[0].float()
            out.append(torch.log_softmax(logits, -1))
    del model
    return out


def compare(row: dict, res: dict, hf, dense_hf, sat: bool) -> dict:
    """Checks one checkpoint; returns the row with verdict, failures and numbers."""
    fails: list[str] = []
    name, scheme, lm = row["name"], row["scheme"], row["lm_head"]
    tol = LP_TOL[scheme]
    if sat and scheme == "W8A8":
        tol = LP_TOL_SATURATING
    row["tol"] = tol

    # --- layers
    layers = res["layers"]
    lin = {k: v for k, v in layers.items() if v["kind"] == "linear"}
    heads = {k: v for k, v in layers.items() if v["kind"] == "lm_head"}
    want = SCHEMES.get(scheme)
    if not lin:
        fails.append("no Linear layers found in the vLLM model")
    for lname, v in sorted(lin.items()):
        if v["scheme"] != want:
            fails.append(f"layer {lname}: scheme {v['scheme']} (quant method "
                         f"{v['quant_method']}), expected {want}")
    if len(heads) != 1:
        fails.append(f"expected one lm_head, found {sorted(heads)}")
    for lname, v in heads.items():
        exp = want if lm else None
        if v["scheme"] != exp:
            fails.append(f"layer {lname}: scheme {v['scheme']} (quant method "
                         f"{v['quant_method']}), expected {exp}")
    row["linear_schemes"] = sorted({v["scheme"] or "dense" for v in lin.values()})
    row["linear_kernels"] = sorted({
        (v["kernel"] or v["quant_method"]) + (f".{v['kernel_path']}" if v["kernel_path"] else "")
        for v in lin.values()})
    hv = next(iter(heads.values()), {})
    row["lm_head_scheme"] = hv.get("scheme") or "dense"
    row["lm_head_kernel"] = (hv.get("kernel") or hv.get("quant_method") or "?") + (
        f".{hv['kernel_path']}" if hv.get("kernel_path") else "")

    # --- generation, tokens and logprobs
    max_diff, max_q_effect = 0.0, 0.0
    worst = None
    token_notes = []
    agree = True
    for i, s in enumerate(res["seqs"]):
        if len(s["gen"]) != N_GEN:
            fails.append(f"prompt {i}: generated {len(s['gen'])} tokens, expected {N_GEN}")
            continue
        full = s["prompt"] + s["gen"]
        lp = hf[i]  # [L, V]
        dlp = dense_hf[i] if dense_hf is not None else None
        pl = len(s["prompt"])
        # greedy: transformers' argmax at each generated step, on vLLM's prefix
        for j, tok in enumerate(s["gen"]):
            pos = pl - 1 + j
            best = int(lp[pos].argmax())
            if best != tok:
                deficit = float(lp[pos, best] - lp[pos, tok])
                if deficit > 2 * tol:
                    fails.append(f"prompt {i} step {j}: vLLM chose token {tok}, transformers "
                                 f"{best} (logprob deficit {deficit:.4f} > {2 * tol:g})")
                    agree = False
                else:
                    token_notes.append(f"p{i} step {j}: near-tie ({deficit:.4f})")
                break  # after a (tolerated) divergence the greedy paths differ
        # logprobs at every position, every token vLLM reported
        entries = [(pl - 1 + j, d) for j, d in enumerate(s["gen_lp"])]
        entries += [(p - 1, d) for p, d in enumerate(s["prompt_lp"]) if d is not None]
        for pos, d in entries:
            for t, v in d.items():
                diff = abs(v - float(lp[pos, int(t)]))
                if diff > max_diff:
                    max_diff, worst = diff, (i, pos, int(t), v, float(lp[pos, int(t)]))
                if dlp is not None:
                    max_q_effect = max(max_q_effect,
                                       abs(float(lp[pos, int(t)]) - float(dlp[pos, int(t)])))
        assert len(full) == lp.shape[0]
    if max_diff > tol:
        i, pos, t, v, h = worst
        fails.append(f"logprob differs by {max_diff:.4g} > {tol:g} (prompt {i}, position {pos}, "
                     f"token {t}: vLLM {v:.4f}, transformers {h:.4f})")
    row["tokens_agree"] = agree
    row["token_notes"] = token_notes
    row["max_lp_diff"] = max_diff
    row["q_effect"] = max_q_effect if dense_hf is not None else None
    row["fails"] = fails
    return row


def run_vllm_batch(vpy: str, names: list[str], paths: dict, prompts_: list, resdir: Path,
                   logf: Path, env_extra: dict, dtype: str, timeout: float) -> dict:
    """Runs `vllm-run` over `names` in one process; if that process dies,
    marks the checkpoint it was on as crashed and resumes after it."""
    resdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = list(names)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1", **env_extra)
    while todo:
        jobs = resdir / "jobs.json"
        jobs.write_text(json.dumps(dict(
            dtype=dtype, prompts=prompts_,
            checkpoints=[dict(name=n, path=str(paths[n])) for n in todo])))
        with open(logf, "a") as lf:
            lf.write(f"\n==== batch {todo}\n")
            lf.flush()
            try:
                p = subprocess.run([vpy, __file__, "vllm-run", "--jobs", str(jobs),
                                    "--results", str(resdir)], stdout=lf, stderr=subprocess.STDOUT,
                                   env=env, timeout=timeout, cwd=str(resdir))
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        rest = []
        for n in todo:
            f = resdir / f"{n}.json"
            if f.exists():
                results[n] = json.loads(f.read_text())
            elif (resdir / f"{n}.started").exists() and not results.get(n):
                results[n] = dict(name=n, load_error=f"vLLM process died (exit {rc}) on this "
                                  f"checkpoint; see {logf}", crashed=True)
            else:
                rest.append(n)
        if rest and rc == 0:
            raise RuntimeError(f"vllm-run exited 0 without results for {rest}; see {logf}")
        todo = rest
    probe = resdir / "_probe.json"
    results["_probe"] = json.loads(probe.read_text()) if probe.exists() else {}
    return results


def fmt_row(cols, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cols, widths))


def drive(args) -> int:
    t_start = time.time()
    work = Path(args.work).resolve()
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "ckpt").mkdir(parents=True, exist_ok=True)
    runid = time.strftime("%Y%m%d-%H%M%S")
    rundir = work / "runs" / runid
    rundir.mkdir(parents=True)
    timings = {}

    rows = matrix()
    if args.only:
        rows = [r for r in rows if any(o in r["name"] for o in args.only.split(","))]
    models_needed = sorted({r["model"] for r in rows})

    # 1. tiny models
    t = time.time()
    for m in models_needed:
        d = work / "models" / m
        if not model_is_current(m, d):
            log(f"making {m}")
            make_model(m, d)
    timings["models"] = time.time() - t

    # 2. quantize with qcli (every run: the suite tests the current qcli)
    t = time.time()
    paths: dict[str, Path] = {}
    for r in rows:
        src = work / "models" / r["model"]
        if r["scheme"] == "dense":
            paths[r["name"]] = src
            continue
        out = work / "ckpt" / r["name"]
        log(f"qcli quantize {r['model']} --scheme {r['scheme']}" + (" --lm-head" if r["lm_head"]
                                                                      else ""))
        quantize(src, out, r["scheme"], r["lm_head"])
        paths[r["name"]] = out
    sat_rows = []
    if not args.no_saturation and SAT_CKPT in paths:
        q63 = SAT_CKPT + "-q63"
        make_q63_variant(work / "models" / PROBE_MODEL, paths[SAT_CKPT], work / "ckpt" / q63)
        paths[q63] = work / "ckpt" / q63
        sat_rows = [SAT_CKPT, q63]
    timings["quantize"] = time.time() - t

    # 3. vLLM, one process for all checkpoints; the saturation experiment in a
    #    second one with oneDNN capped at AVX2 (int8 GEMM without VNNI)
    t = time.time()
    ps = prompts()
    vp = args.vllm_python
    names = [r["name"] for r in rows] + [n for n in sat_rows if n not in {r["name"] for r in rows}]
    log(f"vLLM: {len(names)} checkpoints in {vp}")
    vres = run_vllm_batch(vp, names, paths, ps, rundir / "vllm-native", rundir / "vllm.log", {},
                          args.dtype, timeout=300 + 120 * len(names))
    sres = {}
    if sat_rows:
        log("vLLM: saturation experiment (ONEDNN_MAX_CPU_ISA=AVX2)")
        sres = run_vllm_batch(vp, sat_rows, paths, ps, rundir / "vllm-avx2",
                              rundir / "vllm-avx2.log", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, args.dtype,
                              timeout=300 + 120 * len(sat_rows))
    timings["vllm"] = time.time() - t
    probe = vres.get("_probe", {})
    saturating = bool(probe.get("saturates"))

    # 4. transformers on the same checkpoints, teacher-forced on vLLM's tokens
    t = time.time()
    hf_cache: dict = {}

    def hf_for(name, seqs):
        key = (name, json.dumps(seqs))
        if key not in hf_cache:
            hf_cache[key] = hf_logprobs(paths[name], seqs)
        return hf_cache[key]

    failures = []
    done = []
    for r in rows:
        res = vres.get(r["name"], {})
        r["load_s"] = res.get("load_s")
        if res.get("load_error") or res.get("gen_error") or not res:
            err = res.get("load_error") or res.get("gen_error") or "no result"
            r["error"] = err.splitlines()[0][:300]
            if r.get("probe") and res.get("load_error") and not res.get("crashed"):
                r["verdict"] = "not loadable (probe)"
            else:
                r["verdict"] = "FAIL"
                failures.append(f"{r['name']}: {err.splitlines()[0][:500]}")
            done.append(r)
            continue
        seqs = [s["prompt"] + s["gen"] for s in res["seqs"]]
        hf = hf_for(r["name"], seqs)
        dense = hf_for(f"{r['model']}-dense", seqs) if r["scheme"] != "dense" else None
        compare(r, res, hf, dense, saturating)
        r["verdict"] = "ok" if not r["fails"] else "FAIL"
        failures += [f"{r['name']}: {f}" for f in r["fails"]]
        done.append(r)

    sat_table = []
    for label, rr in (("native", vres), ("AVX2 (no VNNI)", sres)):
        for n in sat_rows:
            res = rr.get(n)
            if not res or res.get("load_error") or res.get("gen_error"):
                sat_table.append(dict(isa=label, name=n, error=(res or {}).get("load_error")
                                      or (res or {}).get("gen_error") or "no result"))
                continue
            seqs = [s["prompt"] + s["gen"] for s in res["seqs"]]
            row = dict(name=n, model=PROBE_MODEL, scheme="W8A8", lm_head=True)
            compare(row, res, hf_for(n, seqs), hf_for(f"{PROBE_MODEL}-dense", seqs), False)
            sat_table.append(dict(isa=label, name=n, max_lp_diff=row["max_lp_diff"],
                                  tokens_agree=row["tokens_agree"], q_effect=row["q_effect"],
                                  kernel=row["linear_kernels"]))
    timings["transformers"] = time.time() - t
    timings["total"] = time.time() - t_start

    # 5. report
    log("")
    log(f"vLLM {probe.get('vllm')} CPU, dtype {args.dtype}; oneDNN int8 GEMM "
        + ("SATURATES on this CPU (no VNNI): W8A8 rows use the saturation tolerance"
           if saturating else "exact on this CPU"))
    hdr = ["checkpoint", "scheme", "lm_head", "Linear scheme / kernel", "lm_head scheme / kernel",
           "tokens", "max|dlp|", "tol", "q-effect", "load s", "verdict"]
    table = []
    for r in done:
        if r.get("error"):
            table.append([r["name"], r["scheme"], "yes" if r["lm_head"] else "no",
                          r["error"][:90], "", "", "", "", "", r.get("load_s") or "",
                          r["verdict"]])
            continue
        table.append([
            r["name"], r["scheme"], "yes" if r["lm_head"] else "no",
            ",".join(r["linear_schemes"]) + " / " + ",".join(r["linear_kernels"]),
            r["lm_head_scheme"] + " / " + r["lm_head_kernel"],
            ("agree" if r["tokens_agree"] else "DIFFER") + ("*" if r["token_notes"] else ""),
            f"{r['max_lp_diff']:.2e}", f"{r['tol']:g}",
            "" if r["q_effect"] is None else f"{r['q_effect']:.2e}",
            r["load_s"], r["verdict"]])
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *table)]
    log(fmt_row(hdr, widths))
    for t_ in table:
        log(fmt_row(t_, widths))
    notes = [f"  {r['name']}: {n}" for r in done for n in r.get("token_notes", [])]
    if notes:
        log("* greedy paths parted at a near-tie (transformers' logprob of vLLM's token within "
            "2x tol of its best):")
        for n in notes:
            log(n)
    log("")
    log("oneDNN int8 GEMM probe (max error / max |output|, exact integer reference):")
    log("  native: " + ", ".join(f"{k}={v:.2%}" for k, v in probe.items()
                                 if k.startswith("K")))
    sp = sres.get("_probe", {}) if sres else {}
    if sp:
        log("  AVX2:   " + ", ".join(f"{k}={v:.2%}" for k, v in sp.items() if k.startswith("K")))
    if sat_table:
        log("saturation experiment on " + SAT_CKPT + " (vLLM vs transformers, same checkpoint):")
        for s in sat_table:
            if "error" in s:
                log(f"  {s['isa']:15} {s['name']:28} error: {s['error'][:200]}")
            else:
                log(f"  {s['isa']:15} {s['name']:28} max|dlp| {s['max_lp_diff']:.3e}  tokens "
                    f"{'agree' if s['tokens_agree'] else 'DIFFER'}  q-effect vs dense "
                    f"{s['q_effect']:.3e}")
    log("")
    log("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    summary = dict(vllm=probe.get("vllm"), dtype=args.dtype, probe=probe, avx2_probe=sp,
                   saturating=saturating, rows=done, saturation=sat_table, timings=timings,
                   failures=failures)
    (rundir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    log(f"results: {rundir}")
    if failures:
        log("")
        log(f"FAILED ({len(failures)}):")
        for f in failures:
            log(f"  {f}")
        return 1
    log("vLLM conformance: all checkpoints passed")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive", help="run the suite (system python)")
    d.add_argument("--vllm-python", required=True, help="python of the vLLM venv")
    d.add_argument("--work", default=os.environ.get("QCLI_VLLM_WORK",
                                                    os.path.expanduser("~/.cache/qcli-vllm-work")),
                   help="models, checkpoints and run results (default %(default)s)")
    d.add_argument("--only", help="comma-separated substrings of checkpoint names")
    d.add_argument("--dtype", default="float32", help="dtype for vLLM and transformers")
    d.add_argument("--no-saturation", action="store_true",
                   help="skip the AVX2 saturation experiment")
    d.add_argument("--json", help="also write the summary here")
    v = sub.add_parser("vllm-run", help="(inside the vLLM venv) run checkpoints")
    v.add_argument("--jobs", required=True)
    v.add_argument("--results", required=True)
    sub.add_parser("gemm-probe", help="(inside the vLLM venv) oneDNN int8 GEMM exactness")
    args = ap.parse_args(argv)
    return {"drive": drive, "vllm-run": vllm_run, "gemm-probe": gemm_probe_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
