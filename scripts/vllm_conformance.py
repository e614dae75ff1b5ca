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
             method / compressed-tensors scheme / kernel and its output on a
             probe input, greedy tokens and log-probabilities, and writes one
             JSON file per checkpoint.
  gemm-probe (inside the vLLM venv) measures vLLM's oneDNN int8 GEMM against
             exact integer arithmetic for full-range (+-127) and +-63 weights.

Checked for every checkpoint (a failure names the checkpoint, and the layer
where there is one):
  1. it loads and generates N_GEN tokens for each prompt;
  2. every vLLM Linear layer carries the scheme SCHEMES[scheme], lm_head too
     exactly when --lm-head was given (dense otherwise);
  3. every Linear and lm_head reproduces x @ W.T + b computed from the
     checkpoint's own tensors (LAYER_TOL; inputs on the activation grid);
  4. greedy tokens and logprobs agree with transformers on the same
     checkpoint (see the tolerance notes below).
W8A16 and FP8 (weight-only) have no kernel in vLLM 0.32's CPU build; they are
tried once and pass as "no CPU kernel (probe)" when vLLM picks the expected
scheme and then reports no kernel for it.

Normally started through scripts/vllm-conformance, which creates or reuses the
venv. See `python scripts/vllm_conformance.py drive --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vllm_suite import report
from vllm_suite.build import (
    make_derived,
    make_model,
    make_q63_variant,
    model_is_current,
    qcli_cmd,
    quantize,
)
from vllm_suite.engine import _kernel_reasons, _scheme_in_traceback, run_vllm_batch
from vllm_suite.judge import _max_diff, check_layer_io, check_layers, compare, hf_logprobs
from vllm_suite.matrix import (
    DERIVED,
    KEEP_RUNS,
    MOE_MODELS,
    NO_MOE_KERNEL,
    PROBE_MODEL,
    SAT_CKPT,
    SCHEMES,
    SENS_SEEDS,
    log,
    matrix,
    prompts,
)
from vllm_suite.worker import gemm_probe_main, vllm_run


def drive(args) -> int:
    """The suite, step by step."""
    run = Run.start(Path(args.work))
    rows = selected_rows(args.only)
    with run.timed("models"):
        make_models(run, rows)
    with run.timed("quantize"):
        sat_rows = quantize_rows(run, rows, args.no_saturation)
    with run.timed("vllm"):
        vres, sres = run_vllm(run, rows, sat_rows, args)
    probe = vres.get("_probe", {})
    saturating = bool(probe.get("saturates"))
    with run.timed("transformers"):
        judge = Judge(run.paths)
        done, failures = judge_rows(judge, rows, vres, saturating)
        main_label = "AVX2-cap" if args.emulate_no_vnni else "native"
        sat_table = saturation_rows(judge, sat_rows, vres, sres, saturating, main_label)
    run.timings["total"] = time.time() - run.t0
    report.print_all(probe, sres, saturating, done, sat_table, main_label, run.timings)
    summary = dict(
        vllm=probe.get("vllm"),
        probe=probe,
        avx2_probe=sres.get("_probe", {}) if sres else {},
        saturating=saturating,
        rows=done,
        saturation=sat_table,
        timings=run.timings,
        failures=failures,
    )
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    log(f"results: {run.dir}")
    return report.print_verdict(failures)


@dataclass
class Run:
    """One run of the suite: its folders, the checkpoint of every row, its timings."""

    work: Path
    dir: Path
    t0: float
    paths: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, work: Path) -> Run:
        work = work.resolve()
        (work / "models").mkdir(parents=True, exist_ok=True)
        (work / "ckpt").mkdir(parents=True, exist_ok=True)
        for old in sorted((work / "runs").glob("*"))[:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)
        rundir = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
        rundir.mkdir(parents=True)
        return cls(work, rundir, time.time())

    @contextmanager
    def timed(self, step: str):
        t = time.time()
        yield
        self.timings[step] = time.time() - t


def selected_rows(only: str | None) -> list[dict]:
    rows = matrix()
    if only:
        rows = [r for r in rows if any(o in r["name"] for o in only.split(","))]
    return rows


def make_models(run: Run, rows: list[dict]) -> None:
    """1. The tiny seeded models (kept between runs while their recipe is unchanged)."""
    wanted = {r["model"] for r in rows}
    bases = {DERIVED[m]["base"] for m in wanted if m in DERIVED}
    for m in sorted((wanted - DERIVED.keys()) | bases):
        d = run.work / "models" / m
        if not model_is_current(m, d):
            log(f"making {m}")
            make_model(m, d)
        run.paths[f"{m}-dense"] = d
    for m in sorted(wanted & DERIVED.keys()):
        d, base = run.work / "models" / m, run.work / "models" / DERIVED[m]["base"]
        if not model_is_current(m, d):
            log(f"making {m} ({DERIVED[m]['form']}) from {DERIVED[m]['base']}")
            make_derived(m, base, d)
        # the dense reference of its quantized rows: the model it was made from
        run.paths[f"{m}-dense"] = base


def quantize_rows(run: Run, rows: list[dict], no_saturation: bool) -> list[str]:
    """2. Every row's checkpoint, with the current qcli (never cached); returns the rows of
    the saturation experiment."""
    jobs = []
    for r in rows:
        if r["scheme"] == "dense":
            run.paths[r["name"]] = run.work / "models" / r["model"]
        else:
            run.paths[r["name"]] = run.work / "ckpt" / r["name"]
            jobs.append(r)
    log(f"qcli quantize: {len(jobs)} checkpoints ({shlex.join(qcli_cmd())})")

    def one(r: dict) -> None:
        src = run.work / "models" / r["model"]
        quantize(src, run.paths[r["name"]], r["scheme"], r["lm_head"], r.get("extra", []))

    with ThreadPoolExecutor(2) as ex:
        for r, fut in [(r, ex.submit(one, r)) for r in jobs]:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001
                log(f"FAILED: {r['name']}: {e}")
                sys.exit(1)
    if SAT_CKPT not in run.paths:
        return []
    # qcli's W8A8 output re-quantized to +-63: exact on every CPU, so it is checked strictly
    # even where full-range int8 saturates
    q63 = SAT_CKPT + "-q63"
    run.paths[q63] = run.work / "ckpt" / q63
    make_q63_variant(run.work / "models" / PROBE_MODEL, run.paths[SAT_CKPT], run.paths[q63])
    rows.append(dict(name=q63, model=PROBE_MODEL, scheme="W8A8", lm_head=True, q63=True))
    return [] if no_saturation else [SAT_CKPT, q63]


def run_vllm(run: Run, rows: list[dict], sat_rows: list[str], args) -> tuple[dict, dict]:
    """3. vLLM, one process for all checkpoints; the saturation experiment in a second one
    with oneDNN capped at AVX2 (int8 GEMM without VNNI)."""
    ps = prompts()
    names = [r["name"] for r in rows]
    log(f"vLLM: {len(names)} checkpoints in {args.vllm_python}")
    main_env = {"ONEDNN_MAX_CPU_ISA": "AVX2"} if args.emulate_no_vnni else {}
    vres = run_vllm_batch(
        args.vllm_python,
        names,
        run.paths,
        ps,
        run.dir / "vllm-main",
        run.dir / "vllm.log",
        main_env,
        "float32",
        timeout=300 + 120 * len(names),
    )
    sres = {}
    if sat_rows:
        log("vLLM: saturation experiment (ONEDNN_MAX_CPU_ISA=AVX2)")
        sres = run_vllm_batch(
            args.vllm_python,
            sat_rows,
            run.paths,
            ps,
            run.dir / "vllm-avx2",
            run.dir / "vllm-avx2.log",
            {"ONEDNN_MAX_CPU_ISA": "AVX2"},
            "float32",
            timeout=300 + 120 * len(sat_rows),
        )
    return vres, sres


class Judge:
    """4. transformers on the same checkpoints, teacher-forced on vLLM's tokens, compared."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = paths
        self._cache: dict = {}

    def hf(self, name, seqs, vllm_scale=False, perturb=None):
        key = (name, json.dumps(seqs), vllm_scale, perturb)
        if key not in self._cache:
            self._cache[key] = hf_logprobs(self.paths[name], seqs, vllm_scale, perturb)
        return self._cache[key]

    def evaluate(self, r: dict, res: dict, saturating: bool) -> dict:
        seqs = [s["prompt"] + s["gen"] for s in res["seqs"]]
        int8_act = r["scheme"] == "W8A8"
        try:
            stock = self.hf(r["name"], seqs)
        except RuntimeError as e:
            if r["model"] not in MOE_MODELS or "conversion of the weights" not in str(e):
                raise
            # transformers 5.24 cannot load W8A8 per-expert MoE checkpoints (qcli.loaders.
            # INT8_EXPERTS): only vLLM's own side is checked, layer by layer
            r["hf_unloadable"] = "transformers cannot load it (qcli.loaders.INT8_EXPERTS)"
            layer_err = check_layer_io(res, self.paths[r["name"]])
            r["fails"] = check_layers(r, res, saturating, layer_err)
            return r
        ref = self.hf(r["name"], seqs, vllm_scale=True) if int8_act else stock
        dense = self.hf(f"{r['model']}-dense", seqs) if r["scheme"] != "dense" else None
        sens = max(
            _max_diff(res, ref, self.hf(r["name"], seqs, int8_act, seed)) for seed in SENS_SEEDS
        )
        layer_err = check_layer_io(res, self.paths[r["name"]])
        return compare(r, res, ref, stock, dense, sens, saturating, layer_err)


def judge_rows(
    judge: Judge, rows: list[dict], vres: dict, saturating: bool
) -> tuple[list[dict], list[str]]:
    """Each row's verdict: loaded and matched transformers, or why not."""
    failures, done = [], []
    for r in rows:
        res = vres.get(r["name"], {})
        r["load_s"] = res.get("load_s")
        if res.get("load_error") or res.get("gen_error") or not res:
            _load_failure(r, res, failures)
        else:
            judge.evaluate(r, res, saturating)
            r["verdict"] = "ok" if not r["fails"] else "FAIL"
            if r.get("hf_unloadable") and not r["fails"]:
                r["verdict"] = "ok (layers; transformers cannot load it)"
            if r.get("known") and not r["fails"]:
                r["verdict"] = "ok (known difference, bounded)"
                log(f"known difference, {r['name']}: {r['known']} (tol {r['tol']:g})")
            if r.get("probe") and not r["fails"]:
                r["verdict"] = "ok (probe: loads now)"
            failures += [f"{r['name']}: {f}" for f in r["fails"]]
        done.append(r)
    return done, failures


def _load_failure(r: dict, res: dict, failures: list[str]) -> None:
    err = res.get("load_error") or res.get("gen_error") or "no result"
    r["error"] = err.strip().splitlines()[-1][:300] if err.strip() else err
    picked = _scheme_in_traceback(res.get("load_traceback", ""))
    r["error_scheme"] = picked
    no_kernel = "Failed to find a kernel" in (res.get("load_error") or "")
    if r.get("probe") and no_kernel and picked == SCHEMES[r["scheme"]]:
        r["verdict"] = "no CPU kernel (probe)"
        r["error"] = f"{picked}: no CPU kernel: " + _kernel_reasons(res["load_error"])
    elif r.get("moe_experts") and any(m in err for m in NO_MOE_KERNEL):
        # vLLM's CPU build has MoE kernels for these schemes only with AMX; on a GPU or an
        # AMX CPU the row loads and gets the full checks
        r["verdict"] = "skipped: no MoE kernel here"
        r["error"] = (
            f"vLLM has no {r['scheme']} MoE kernel on this machine (its CPU build needs "
            f"AMX; a GPU runs it): {r['error']}"
        )
    else:
        r["verdict"] = "FAIL"
        failures.append(f"{r['name']}: {r['error']}")


def saturation_rows(
    judge: Judge,
    sat_rows: list[str],
    vres: dict,
    sres: dict,
    saturating: bool,
    main_label: str,
) -> list[dict]:
    """The saturation experiment: full-range W8A8 and its +-63 variant, native and capped."""
    table = []
    for label, rr, sat_ in ((main_label, vres, saturating), ("AVX2-cap", sres, True)):
        for n in sat_rows:
            res = rr.get(n)
            if not res or res.get("load_error") or res.get("gen_error"):
                error = (res or {}).get("load_error") or (res or {}).get("gen_error")
                table.append(dict(isa=label, name=n, error=error or "no result"))
                continue
            r = dict(name=n, model=PROBE_MODEL, scheme="W8A8", lm_head=True)
            row = judge.evaluate(r, res, False)
            table.append(
                dict(
                    isa=label,
                    saturating_isa=sat_,
                    name=n,
                    layer_err=row["layer_err"],
                    max_lp_diff=row["max_lp_diff"],
                    median_lp_diff=row["median_lp_diff"],
                    max_lp_diff_stock=row["max_lp_diff_stock"],
                    tokens_agree=row["tokens_agree"],
                    q_effect=row["q_effect"],
                    tol=row["tol"],
                    kernel=row["linear_kernels"],
                )
            )
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive", help="run the suite (system python)")
    d.add_argument("--vllm-python", required=True, help="python of the vLLM venv")
    d.add_argument(
        "--work",
        default=os.environ.get("QCLI_VLLM_WORK", os.path.expanduser("~/.cache/qcli-vllm-work")),
        help="models, checkpoints and run results (default %(default)s)",
    )
    d.add_argument("--only", help="comma-separated substrings of checkpoint names")
    d.add_argument(
        "--no-saturation", action="store_true", help="skip the AVX2 saturation experiment"
    )
    d.add_argument(
        "--emulate-no-vnni",
        action="store_true",
        help="run every checkpoint with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA), "
        "as on a CPU without VNNI, to exercise the saturation path",
    )
    d.add_argument("--json", help="also write the summary here")
    v = sub.add_parser("vllm-run", help="(inside the vLLM venv) run checkpoints")
    v.add_argument("--jobs", required=True)
    v.add_argument("--results", required=True)
    sub.add_parser("gemm-probe", help="(inside the vLLM venv) oneDNN int8 GEMM exactness")
    args = ap.parse_args(argv)
    return {"drive": drive, "vllm-run": vllm_run, "gemm-probe": gemm_probe_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
