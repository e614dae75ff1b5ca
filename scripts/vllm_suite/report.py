"""Step 5: what the suite found, as tables (and the verdict)."""

from __future__ import annotations

from vllm_suite.matrix import SAT_CKPT, log


def print_table(hdr, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows, strict=False)]
    for r in [hdr] + rows:
        log("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def print_all(probe, sres, saturating, done, sat_table, main_label, timings) -> None:
    log("")
    log(
        f"vLLM {probe.get('vllm')} CPU build, float32; oneDNN int8 GEMM "
        + (
            "SATURATES on this CPU (no VNNI): W8A8 rows checked against the saturation bound"
            if saturating
            else "exact on this CPU (gemm-probe)"
        )
    )
    log("")
    print_loads(done)
    print_checks(done)
    print_probe(probe, sres, main_label)
    print_saturation(sat_table)
    log("")
    log("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))


def print_verdict(failures: list[str]) -> int:
    if failures:
        log("")
        log(f"FAILED ({len(failures)}):")
        for f in failures:
            log(f"  {f}")
        return 1
    log("vLLM conformance: all checkpoints passed")
    return 0


def print_loads(done) -> None:
    """Which scheme and kernel vLLM picked for every Linear and for lm_head."""
    hdr = ["checkpoint", "Linear: scheme / kernel", "lm_head: scheme / kernel", "load s"]
    table = []
    for r in done:
        if r.get("error"):
            table.append([r["name"], "error: " + r["error"][:100], "", r.get("load_s") or ""])
        else:
            table.append(
                [
                    r["name"],
                    ",".join(r["linear_schemes"]) + " / " + ",".join(r["linear_kernels"]),
                    r["lm_head_scheme"] + " / " + r["lm_head_kernel"],
                    r["load_s"],
                ]
            )
    print_table(hdr, table)


def print_checks(done) -> None:
    """Layer errors and log-probabilities against transformers, and the verdicts."""
    log("")
    hdr = [
        "checkpoint",
        "scheme",
        "lm_head",
        "layer err",
        "tokens",
        "median|dlp|",
        "max|dlp|",
        "tol",
        "max|dlp| plain HF",
        "q-effect",
        "verdict",
    ]
    table = []
    for r in done:
        if r.get("error") or r.get("hf_unloadable"):
            layer = r.get("layer_err")
            table.append(
                [
                    r["name"],
                    r["scheme"],
                    "yes" if r["lm_head"] else "no",
                    f"{layer:.1e}" if layer is not None else "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    r["verdict"],
                ]
            )
            continue
        table.append(
            [
                r["name"],
                r["scheme"],
                "yes" if r["lm_head"] else "no",
                f"{r['layer_err']:.1e}" if r.get("layer_err") is not None else "?",
                ("agree" if r["tokens_agree"] else "DIFFER") + ("*" if r["token_notes"] else ""),
                f"{r['median_lp_diff']:.1e}",
                f"{r['max_lp_diff']:.1e}",
                f"{r['tol']:.1e}" + (" SAT" if r["saturating"] else ""),
                f"{r['max_lp_diff_stock']:.1e}",
                "" if r["q_effect"] is None else f"{r['q_effect']:.1e}",
                r["verdict"],
            ]
        )
    print_table(hdr, table)
    notes = [f"  {r['name']}: {n}" for r in done for n in r.get("token_notes", [])]
    if notes:
        log(
            "* greedy paths parted where transformers' logprob of vLLM's token is within tol "
            "of its best (a near-tie; or, flagged, a saturating int8 GEMM):"
        )
        for n in notes:
            log(n)
    log(
        "columns: layer err = max over Linear/lm_head layers of |vLLM - x @ W.T + b from the "
        "checkpoint| / max|exact|; |dlp| = |logprob vLLM - transformers (vLLM's int8 activation "
        "scale)| over "
        "every position and top-k token; tol = max(1e-3, 2 x the reference's own change under "
        "1e-6 relative noise); plain HF = stock transformers (absmax/127.5 activation scale "
        "for int8); q-effect = transformers quantized vs dense, for scale"
    )


def print_probe(probe, sres, main_label) -> None:
    log("")
    log("oneDNN int8 GEMM probe (max error / max |output| vs exact integer math, M=8 N=256):")
    log(
        f"  {main_label:8} "
        + ", ".join(f"{k}={v:.2%}" for k, v in probe.items() if k.startswith("K"))
    )
    sp = sres.get("_probe", {}) if sres else {}
    if sp:
        log("  AVX2-cap " + ", ".join(f"{k}={v:.2%}" for k, v in sp.items() if k.startswith("K")))


def print_saturation(sat_table) -> None:
    if sat_table:
        log(
            f"saturation experiment on {SAT_CKPT} and its +-63 re-quantization, vLLM vs "
            "transformers (vLLM's activation scale):"
        )
        for s_ in sat_table:
            if "error" in s_:
                log(f"  {s_['isa']:8} {s_['name']:28} error: {s_['error'][:200]}")
            else:
                log(
                    f"  {s_['isa']:8} {s_['name']:28} median|dlp| {s_['median_lp_diff']:.1e}  "
                    f"layer err {s_['layer_err']:.1e}  "
                    f"max|dlp| {s_['max_lp_diff']:.1e} (tol {s_['tol']:.1e})  tokens "
                    f"{'agree' if s_['tokens_agree'] else 'DIFFER'}  q-effect "
                    f"{s_['q_effect']:.1e}"
                )
