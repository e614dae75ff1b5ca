"""Step 3: vLLM in its own venv, one process for a batch of checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from vllm_suite.matrix import SCHEMES, log

# the entry point that dispatches the `vllm-run` role inside the vLLM venv
DRIVER = Path(__file__).resolve().parent.parent / "vllm_conformance.py"


def run_vllm_batch(
    vpy: str,
    names: list[str],
    paths: dict,
    prompts_: list,
    resdir: Path,
    logf: Path,
    env_extra: dict,
    dtype: str,
    timeout: float,
) -> dict:
    """Runs `vllm-run` over `names` in one process; if that process dies,
    marks the checkpoint it was on as crashed and resumes after it."""
    resdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = list(names)
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",
        **env_extra,
    )
    while todo:
        jobs = resdir / "jobs.json"
        jobs.write_text(
            json.dumps(
                dict(
                    dtype=dtype,
                    prompts=prompts_,
                    checkpoints=[dict(name=n, path=str(paths[n])) for n in todo],
                )
            )
        )
        with open(logf, "a") as lf:
            lf.write(f"\n==== batch {todo}\n")
            lf.flush()
            try:
                p = subprocess.run(
                    [vpy, str(DRIVER), "vllm-run", "--jobs", str(jobs), "--results", str(resdir)],
                    stdout=lf,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=timeout,
                    cwd=str(resdir),
                )
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        rest = []
        for n in todo:
            f = resdir / f"{n}.json"
            if f.exists():
                results[n] = json.loads(f.read_text())
            elif (resdir / f"{n}.started").exists() and not results.get(n):
                results[n] = dict(
                    name=n,
                    load_error=f"vLLM process died (exit {rc}) on this checkpoint; see {logf}",
                    crashed=True,
                )
            else:
                rest.append(n)
        if rest and (rc == 0 or len(rest) == len(todo)):
            # no progress: vLLM itself does not start (import error, bad venv)
            tail = logf.read_text()[-3000:] if logf.exists() else ""
            for n in rest:
                results[n] = dict(
                    name=n, load_error=f"vllm-run exited {rc} before this checkpoint; see {logf}"
                )
            log(f"vllm-run exited {rc} without starting; last lines of {logf}:\n{tail}")
            rest = []
        todo = rest
    probe = resdir / "_probe.json"
    results["_probe"] = json.loads(probe.read_text()) if probe.exists() else {}
    return results


def _scheme_in_traceback(tb: str) -> str | None:
    """The compressed-tensors scheme class whose create_weights raised."""
    import re

    files = re.findall(r"schemes/compressed_tensors_(\w+)\.py", tb)
    if not files:
        return None
    stem = files[-1]
    for cls in SCHEMES.values():
        if cls.lower().replace("compressedtensors", "") == stem.replace("_", "").lower():
            return cls
    return "compressed_tensors_" + stem


def _kernel_reasons(err: str) -> str:
    lines = [x.strip() for x in err.splitlines()[1:] if x.strip()]
    return "; ".join(lines) if lines else "no kernel is registered for this platform"
