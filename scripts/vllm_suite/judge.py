"""Step 4: transformers on the same checkpoints, and the comparison with vLLM's numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vllm_suite.matrix import (
    KNOWN_DIFFERENCES,
    LAYER_TOL,
    LAYER_TOL_SATURATING,
    LP_MEDIAN_TOL,
    LP_TOL_FLOOR,
    LP_TOL_SATURATING,
    N_GEN,
    ROUTER_LINEAR,
    SCHEMES,
    SENS_FACTOR,
)


class Checkpoint:
    """A small checkpoint's tensors, read whole (the conformance models are tiny), with each
    vLLM layer's weight rebuilt the way its loader reads it: dequantized, fused parts stacked."""

    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.t = {}
        self.config = json.loads((Path(path) / "config.json").read_text())
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    self.t[k] = h.get_tensor(k)

    def _weight(self, module: str):
        import torch

        t = self.t
        if module == "lm_head" and not any(k.startswith("lm_head.") for k in t):
            module = "model.embed_tokens"  # tied: vLLM's lm_head is the embedding table
        scale = t.get(module + ".weight_scale")
        if module + ".weight_packed" in t:
            from qcli.layout import unpack_int8

            shape = tuple(t[module + ".weight_shape"].tolist())
            q = unpack_int8(t[module + ".weight_packed"], shape)
        elif module + ".weight" in t:
            q = t[module + ".weight"]
        else:
            return None, None
        w = q.to(torch.float64)
        if scale is not None:
            w = w * scale.to(torch.float64)
        bias = t.get(module + ".bias")
        return w, None if bias is None else bias.to(torch.float64)

    def _rotary_rows(self, part: str, w):
        """vLLM's Llama 4 loader reorders q_proj and k_proj rows (and their scales) for its
        rotary layout (llama4.py, permute_qk_weight_for_rotary): the same order here."""
        leaf = part.rpartition(".")[2]
        if leaf not in ("q_proj", "k_proj"):
            return w
        heads = self.config["num_key_value_heads" if leaf == "k_proj" else "num_attention_heads"]
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    def layer(self, name: str):
        """(weight [out, in], bias or None) in float64, or (None, None) if not found."""
        import torch

        if name.endswith(".block_sparse_moe.gate"):  # GraniteMoE's router, as vLLM names it
            name = name.removesuffix(".gate") + ".router.layer"
        prefix, _, leaf = name.rpartition(".")
        parts = [name]
        if (
            leaf in self.FUSED
            and name + ".weight" not in self.t
            and (name + ".weight_packed" not in self.t)
        ):
            parts = [f"{prefix}.{p}" if prefix else p for p in self.FUSED[leaf]]
        ws, bs = zip(*(self._weight(p) for p in parts), strict=True)
        if any(w is None for w in ws):
            return None, None
        if str(self.config.get("model_type")).startswith("llama4"):  # llama4_text too
            ws = tuple(self._rotary_rows(p, w) for p, w in zip(parts, ws, strict=True))
        bias = (
            None
            if all(b is None for b in bs)
            else torch.cat(
                [
                    b if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
                    for w, b in zip(ws, bs, strict=True)
                ]
            )
        )
        return torch.cat(ws), bias


def check_layer_io(res: dict, ckpt_path: Path) -> dict:
    """Each vLLM layer's output on its probe input against x @ W.T + b from
    the checkpoint (float64): max error as a fraction of max |exact output|."""
    import torch

    ck = Checkpoint(ckpt_path)
    errs = {}
    for name, io in res.get("layer_io", {}).items():
        w, b = ck.layer(name)
        if w is None:
            errs[name] = None
            continue
        x, y = (
            torch.tensor(io["x"], dtype=torch.float64),
            torch.tensor(io["y"], dtype=torch.float64),
        )
        ref = x @ w.T + (b if b is not None else 0)
        if ref.shape != y.shape:
            errs[name] = float("inf")
            continue
        errs[name] = float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    return errs


class _VllmActScale:
    """Context manager: transformers' compressed-tensors fake quantization
    with vLLM's int8 activation scale.

    compressed-tensors computes a dynamic symmetric int8 scale as
    absmax / 127.5 (half the 255-wide range) and clamps to [-128, 127];
    vLLM's CPU kernel (onednn_scaled_int8_quant) uses absmax / 127. Both are
    valid readings of the same checkpoint (the checkpoint stores no activation
    scale), but they put activations on different grids, which by itself moves
    these models' logprobs by up to ~0.1. The aligned reference multiplies
    compressed-tensors' dynamic int8 scale by 127.5/127 and nothing else."""

    def __enter__(self):
        import compressed_tensors.quantization.lifecycle.forward as ctf

        self._mod, self._orig = ctf, ctf.compute_dynamic_scales_and_zp
        orig = self._orig

        def patched(value, args, module, global_scale=None):
            scale, zp = orig(value, args, module, global_scale)
            if str(getattr(args.type, "value", args.type)) == "int" and args.symmetric:
                scale = scale * (127.5 / 127.0)
            return scale, zp

        ctf.compute_dynamic_scales_and_zp = patched
        return self

    def __exit__(self, *exc):
        self._mod.compute_dynamic_scales_and_zp = self._orig


def hf_logprobs(
    path: Path, seqs: list[list[int]], vllm_act_scale: bool = False, perturb_seed: int | None = None
) -> list:
    """transformers on the checkpoint, float32, teacher-forced on `seqs`:
    log_softmax at every position (row p predicts token p+1).
    perturb_seed: multiply the embedding table by (1 + 1e-6 * N(0,1)) first,
    to measure how far fp32-level noise alone moves this model's logprobs."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    ctx = _VllmActScale() if vllm_act_scale else contextlib.nullcontext()
    out = []
    with torch.no_grad(), ctx:
        if perturb_seed is not None:
            emb = model.get_input_embeddings().weight
            g = torch.Generator().manual_seed(perturb_seed)
            emb.mul_(1 + 1e-6 * torch.randn(emb.shape, generator=g))
        for s in seqs:
            logits = model(torch.tensor([s])).logits[0].float()
            out.append(torch.log_softmax(logits, -1))
    del model
    return out


def _entries(res: dict):
    """(prompt index, row, token, vLLM logprob) for every logprob vLLM
    reported: prompt positions (prompt_logprobs) and generated steps (top-k
    plus the chosen token)."""
    for i, s in enumerate(res["seqs"]):
        pl = len(s["prompt"])
        for p, d in enumerate(s["prompt_lp"]):
            if d is not None:
                for t, v in d.items():
                    yield i, p - 1, int(t), v
        for j, d in enumerate(s["gen_lp"]):
            for t, v in d.items():
                yield i, pl - 1 + j, int(t), v


def _max_diff(res, a, b=None):
    """max |vLLM - a| (b None) or max |a - b| over the reported entries."""
    m = 0.0
    for i, row, t, v in _entries(res):
        x = v if b is None else float(b[i][row, t])
        m = max(m, abs(x - float(a[i][row, t])))
    return m


def _saturating_row(row: dict, saturating: bool) -> bool:
    """Full-range W8A8 on a CPU whose int8 GEMM saturates (the +-63 variant is exact)."""
    return saturating and row["scheme"] == "W8A8" and not row.get("q63")


def check_layers(row: dict, res: dict, saturating: bool, layer_err: dict) -> list[str]:
    """What vLLM built for one checkpoint, against the checkpoint: every Linear, MoE layer and
    lm_head with the expected scheme (routers dense), and every Linear and lm_head computing
    x @ W.T + b of the checkpoint's own tensors. Returns the failures; fills `row`'s layer
    columns. (Long: one check after another, in the order the report lists them.)"""
    fails: list[str] = []
    scheme, lm = row["scheme"], row["lm_head"]
    layers = res["layers"]
    lin = {k: v for k, v in layers.items() if v["kind"] == "linear"}
    heads = {k: v for k, v in layers.items() if v["kind"] == "lm_head"}
    want = SCHEMES.get(scheme)
    if not lin:
        fails.append("no Linear layers found in the vLLM model")
    for lname, v in sorted(lin.items()):
        exp = None if re.match(ROUTER_LINEAR, lname) else want
        if v["scheme"] != exp:
            fails.append(
                f"layer {lname}: scheme {v['scheme']} (quant method "
                f"{v['quant_method']}), expected {exp}"
            )
    # MoE experts: dense when the row keeps them dense, else the scheme's MoE method
    for lname, v in sorted((k, v) for k, v in layers.items() if v["kind"] == "moe"):
        qm = v["quant_method"] or ""
        ok = qm.startswith("CompressedTensors") if row.get("moe_experts") else "Unquantized" in qm
        if not ok:
            what = f"{scheme} experts" if row.get("moe_experts") else "dense experts"
            fails.append(f"layer {lname}: quant method {qm or None}, expected {what}")
    if len(heads) != 1:
        fails.append(f"expected one lm_head, found {sorted(heads)}")
    for lname, v in heads.items():
        exp = want if lm else None
        if v["scheme"] != exp:
            fails.append(
                f"layer {lname}: scheme {v['scheme']} (quant method "
                f"{v['quant_method']}), expected {exp}"
            )

    def kern(v):
        k = v.get("kernel") or v.get("quant_method") or "?"
        return k + (f" ({v['kernel_path'].strip('_')})" if v.get("kernel_path") else "")

    row["linear_schemes"] = sorted({v["scheme"] or "dense" for v in lin.values()})
    row["linear_kernels"] = sorted({kern(v) for v in lin.values()})
    hv = next(iter(heads.values()), {})
    row["lm_head_scheme"] = hv.get("scheme") or "dense"
    row["lm_head_kernel"] = kern(hv) if hv else "?"

    # --- each layer against the checkpoint's math (exact up to fp32 rounding)
    sat = _saturating_row(row, saturating)
    ltol = LAYER_TOL_SATURATING if sat else LAYER_TOL
    for lname in sorted(lin.keys() | heads.keys()):
        e = layer_err.get(lname)
        if e is None:
            fails.append(f"layer {lname}: no checkpoint tensors found for it")
        elif e > ltol:
            fails.append(
                f"layer {lname}: output differs from x @ W.T + b of the checkpoint by "
                f"{e:.3g} of its range (tol {ltol:g})"
            )
    known = [e for e in layer_err.values() if e is not None]
    row["layer_err"] = max(known) if known else None
    row["layer_err_worst"] = max(layer_err, key=lambda k: layer_err[k] or 0) if known else None
    return fails


def compare(
    row: dict, res: dict, ref, stock, dense, sens: float, saturating: bool, layer_err: dict
) -> dict:
    """Checks one checkpoint. ref: transformers with vLLM's activation scale
    convention (== stock for schemes without int8 activations); stock: plain
    transformers; dense: transformers on the unquantized model; sens: how far
    fp32-level noise moves ref (see hf_logprobs). Returns `row` with the
    verdict inputs: failures, numbers. (Long: the token and logprob checks in turn.)"""
    import statistics

    fails = check_layers(row, res, saturating, layer_err)
    sat = _saturating_row(row, saturating)

    # --- tolerances
    strict_tol = max(LP_TOL_FLOOR, SENS_FACTOR * sens)
    tol = LP_TOL_SATURATING if sat else strict_tol
    known = KNOWN_DIFFERENCES.get(row["name"])
    if known:  # a measured, unexplained difference: bounded, not waved through
        tol = max(tol, known["max_lp_diff"])
    row.update(sens=sens, tol=tol, saturating=sat, known=known and known["why"])
    # The median check assumes whole-step flips are rare. Where fp32-level noise alone moves
    # the reference's logprobs by more than LP_TOL_FLOOR (MoE routing on quantized
    # activations: a flipped top-k choice early in a prompt moves every later position),
    # it is not: the max bound, from that same sensitivity, is the check there.
    stable = sens <= LP_TOL_FLOOR and not known

    # --- greedy tokens: ref's argmax at each generated step, on vLLM's prefix
    agree, notes = True, []
    for i, s in enumerate(res["seqs"]):
        if len(s["gen"]) != N_GEN:
            fails.append(f"prompt {i}: generated {len(s['gen'])} tokens, expected {N_GEN}")
            agree = False
            continue
        pl = len(s["prompt"])
        for j, tok in enumerate(s["gen"]):
            lp = ref[i][pl - 1 + j]
            best = int(lp.argmax())
            if best != tok:
                deficit = float(lp[best] - lp[tok])
                if deficit > tol:
                    fails.append(
                        f"prompt {i} step {j}: vLLM chose token {tok}, transformers "
                        f"{best} (logprob deficit {deficit:.4f} > tol {tol:.3g})"
                    )
                    agree = False
                elif deficit > strict_tol:  # only reachable on a saturating CPU
                    notes.append(
                        f"prompt {i} step {j}: differs (saturating int8 GEMM), deficit "
                        f"{deficit:.4f} <= {tol:g}"
                    )
                    agree = False
                else:
                    notes.append(f"prompt {i} step {j}: near-tie, deficit {deficit:.4f}")
                break  # past a tolerated divergence the two greedy paths differ
    row["tokens_agree"], row["token_notes"] = agree, notes

    # --- logprobs
    diffs = []
    worst = (0.0, None)
    for i, r_, t, v in _entries(res):
        d = abs(v - float(ref[i][r_, t]))
        diffs.append(d)
        if d > worst[0]:
            worst = (d, (i, r_, t, v, float(ref[i][r_, t])))
    if not diffs:
        fails.append("vLLM returned no logprobs")
        diffs = [float("inf")]
    row["max_lp_diff"] = max(diffs)
    row["median_lp_diff"] = statistics.median(diffs)
    row["n_lp"] = len(diffs)
    if row["max_lp_diff"] > tol:
        i, r_, t, v, h = worst[1]
        fails.append(
            f"logprob differs by {row['max_lp_diff']:.4g} > tol {tol:.3g} (prompt {i}, "
            f"position {r_ + 1}, token {t}: vLLM {v:.5f}, transformers {h:.5f})"
        )
    if not sat and stable and row["median_lp_diff"] > LP_MEDIAN_TOL:
        fails.append(
            f"median logprob difference {row['median_lp_diff']:.3g} > "
            f"{LP_MEDIAN_TOL:g}: vLLM does not compute what transformers computes"
        )
    # plain transformers: the activation-scale convention gap on top
    conv_gap = _max_diff(res, ref, stock) if stock is not ref else 0.0
    row["conv_gap"] = conv_gap
    row["max_lp_diff_stock"] = _max_diff(res, stock)
    if row["max_lp_diff_stock"] > tol + conv_gap:
        fails.append(
            f"logprob differs from plain transformers by {row['max_lp_diff_stock']:.4g} "
            f"> tol + convention gap {tol + conv_gap:.3g}"
        )
    row["q_effect"] = _max_diff(res, ref, dense) if dense is not None else None
    row["fails"] = fails
    return row
