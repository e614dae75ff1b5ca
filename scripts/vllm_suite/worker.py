"""What runs inside the vLLM venv: load each checkpoint with vllm.LLM, record every layer's
scheme and kernel and its output on a probe input, greedy tokens and logprobs; the GEMM probe.

Imports only vLLM (and torch), never qcli: the venv has neither qcli nor its transformers."""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from pathlib import Path

from vllm_suite.matrix import N_GEN, N_PROMPTS, SEED, TOPK

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
        elif "FusedMoE" in mro:  # the experts of one MoE layer
            kind = "moe"
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


def layer_io(model) -> dict:
    """Runs inside the vLLM worker: feeds every Linear and lm_head a seeded
    input and returns input and output, so the driver can compare each layer
    with the checkpoint's own math.

    The inputs are already on the layer's activation grid (int8: integers
    times 2**-5 with a row maximum of exactly 127; fp8: e4m3 values times
    2**-5 with a row maximum of exactly 448), so vLLM's dynamic activation
    quantization is lossless and the exact answer is x @ dequant(W).T + b,
    whatever rounding convention a kernel uses."""
    import torch

    out = {}
    idx = 0
    for name, mod in model.named_modules():
        mro = [c.__name__ for c in type(mod).__mro__]
        is_head = "ParallelLMHead" in mro
        if "LinearBase" not in mro and not is_head:
            continue
        idx += 1
        g = torch.Generator().manual_seed(SEED + 1000 + idx)
        k = mod.embedding_dim if is_head else mod.input_size
        scheme = type(getattr(mod, "scheme", None)).__name__
        c = 2.0**-5
        if "Int8" in scheme:
            x = torch.randint(-127, 128, (4, k), generator=g).float()
            x[:, 0] = 127.0
        elif "Fp8" in scheme:
            x = (torch.randn(4, k, generator=g) * 64).clamp(-448, 448)
            x = x.to(torch.float8_e4m3fn).float()
            x[:, 0] = 448.0
        else:
            x = torch.randn(4, k, generator=g) * 32
        x = (x * c).to(torch.get_default_dtype())
        with torch.no_grad():
            if is_head:
                y = mod.quant_method.apply(mod, x)[:, : mod.org_vocab_size]
            else:
                y = mod(x)
                y = y[0] if isinstance(y, tuple) else y
        out[name] = dict(x=x.float().tolist(), y=y.float().tolist())
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
    (outdir / "_probe.json").write_text(
        json.dumps(dict(probe, vllm=vllm.__version__, import_s=import_s), indent=1)
    )

    sp = SamplingParams(
        temperature=0.0,
        max_tokens=N_GEN,
        logprobs=TOPK,
        prompt_logprobs=TOPK,
        ignore_eos=True,
        detokenize=False,
        seed=SEED,
    )
    for job in jobs["checkpoints"]:
        name = job["name"]
        (outdir / f"{name}.started").write_text("")
        res = dict(name=name, path=job["path"], load_error=None, gen_error=None)
        t = time.time()
        llm = None
        try:
            llm = LLM(
                model=job["path"],
                enforce_eager=True,
                distributed_executor_backend="uni",
                max_model_len=128,
                skip_tokenizer_init=True,
                dtype=jobs["dtype"],
                seed=SEED,
                max_num_seqs=N_PROMPTS,
            )
        except Exception as e:  # noqa: BLE001 - recorded, judged by the driver
            res["load_error"] = f"{type(e).__name__}: {e}"
            res["load_traceback"] = traceback.format_exc()[-4000:]
        res["load_s"] = round(time.time() - t, 1)
        if llm is not None:
            try:
                res["layers"] = llm.apply_model(inspect_layers)[0]
                res["layer_io"] = llm.apply_model(layer_io)[0]
                t = time.time()
                outs = llm.generate(
                    [{"prompt_token_ids": p} for p in jobs["prompts"]], sp, use_tqdm=False
                )
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
