"""`qcli eval --engine vllm`: the serving engine's own view, from vLLM's prompt log-probabilities.

vLLM runs in a Python of its own (its venv pins its own transformers): qcli starts
qcli/evaluation/vllm_worker.py there, sends it windows and reads back, per position, the
target token's log-probability and vLLM's top-k. Perplexity and top-1 agreement are then
exact; the KL divergence is a lower bound: it is computed on the tokens both models list in
their top-1000 plus one bucket for the rest (merging outcomes never raises KL): measured on
SmolLM2-135M, 91-95% of transformers' exact sum (tests/vllm/test_eval_vllm.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcli.errors import InputError

TOPK = 1000
WORKER = Path(__file__).with_name("vllm_worker.py")
REST_FLOOR = 1e-6


@dataclass(frozen=True)
class TopK:
    """What vLLM reports for each scored position: the target's log-probability and the k
    most likely tokens (ids and log-probabilities, most likely first)."""

    target: torch.Tensor  # [n]
    ids: torch.Tensor  # [n, k] int64
    logp: torch.Tensor  # [n, k] float32

    def pack(self) -> torch.Tensor:
        """One float32 row per position (ids are below 2**24, exact in float32): for the
        reference cache, which stores rows of floats."""
        return torch.cat([self.target[:, None], self.ids.float(), self.logp], dim=1)

    @classmethod
    def unpack(cls, rows: torch.Tensor) -> TopK:
        k = (rows.shape[1] - 1) // 2
        return cls(rows[:, 0], rows[:, 1 : 1 + k].long(), rows[:, 1 + k :])


def find_python(given: str | None) -> str:
    """The Python that has vLLM: --vllm-python / QCLI_VLLM_PYTHON, else this one."""
    python = given or sys.executable
    if shutil.which(python) is None and not Path(python).is_file():
        raise InputError(f"--vllm-python {python}: no such interpreter")
    probe = subprocess.run(
        [
            python,
            "-c",
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)",
        ],
        capture_output=True,
        timeout=120,
    )
    if probe.returncode != 0:
        raise InputError(
            f"--engine vllm: {python} has no vLLM (install vllm there, or pass --vllm-python"
            " PYTHON of a venv that has it, e.g. the one scripts/vllm-conformance makes)"
        )
    return python


def vllm_model(given_python: str | None, ctx: int):
    python = find_python(given_python)
    return lambda path, dtype: VllmModel(path, dtype, python, ctx)


class VllmModel:
    """One checkpoint in vLLM, served by a worker process until closed."""

    engine = "vllm"

    def __init__(self, path: Path, dtype: torch.dtype, python: str, ctx: int = 4096):
        self.path, self.dtype = Path(path), dtype
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        self.proc = subprocess.Popen(
            [
                python,
                str(WORKER),
                str(path),
                "--dtype",
                str(dtype).removeprefix("torch."),
                "--ctx",
                str(ctx),
                "--topk",
                str(TOPK),
            ],  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        first = self.proc.stdout.readline() if self.proc.stdout else ""
        if not first:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.wait()
            last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            raise InputError(f"vLLM cannot load {path}: {last[0][:300]}")
        self.ready: dict[str, Any] = json.loads(first)
        self._drain = self._stderr_drain()

    def _stderr_drain(self):
        import threading

        def run() -> None:
            for _ in self.proc.stderr or ():  # keep the pipe from filling up
                pass

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "loader": f"vLLM {self.ready.get('vllm')}",
            "dtype": str(self.dtype).removeprefix("torch."),
            "kernels": "; ".join(self.ready.get("linear") or []) or "?",
            "lm_head": self.ready.get("lm_head"),
            "kl": f"lower bound from the top-{TOPK} tokens of each model",
        }

    @property
    def vocab(self) -> int:
        return 2 * TOPK + 1  # the width of a packed row (see TopK.pack)

    def scored(self, ids: list[int], first: int) -> TopK:
        """The scored positions of a window (targets ids[first:]; vLLM reports positions 1
        onwards, so `first` is 1 here)."""
        assert first == 1 and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(ids) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise InputError(f"vLLM stopped while scoring {self.path} (exit {self.proc.wait()})")
        rows = json.loads(line)
        # position 0 (the first token) has no prediction: rows start at position 1
        return TopK(
            torch.tensor([r["target"] for r in rows]),
            torch.tensor([r["ids"] for r in rows], dtype=torch.int64),
            torch.tensor([r["logp"] for r in rows], dtype=torch.float32),
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kl_lower_bound(ref: TopK, q: TopK) -> torch.Tensor:
    """KL(p_ref || p_q) per position on the partition {tokens in both top-k lists} + {rest}:
    merging outcomes never raises KL, so this is at most the full sum."""
    out = torch.empty(ref.ids.shape[0], dtype=torch.float64)
    for i in range(ref.ids.shape[0]):
        qmap = dict(zip(q.ids[i].tolist(), q.logp[i].tolist(), strict=True))
        p_known = q_known = kl = 0.0
        for tid, lp in zip(ref.ids[i].tolist(), ref.logp[i].tolist(), strict=True):
            if tid in qmap:
                p = math.exp(lp)
                kl += p * (lp - qmap[tid])
                p_known += p
                q_known += math.exp(qmap[tid])
        # below REST_FLOOR the leftover mass is float32 rounding of the softmax, not mass
        p_rest, q_rest = 1.0 - p_known, max(REST_FLOOR, 1.0 - q_known)
        if p_rest > REST_FLOOR:
            kl += p_rest * (math.log(p_rest) - math.log(q_rest))
        out[i] = max(0.0, kl)
    return out
