"""vLLM's CPU build loads qcli's checkpoints: runs scripts/vllm-conformance.

Opt-in (`pytest -m vllm`): the first run installs vLLM's CPU build into a cached venv
(about 5 minutes, 2.5 GB, see QCLI_VLLM_VENV); the suite itself takes about 6 minutes on
two cores. CI runs the script directly (.ci/run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "vllm-conformance"


@pytest.mark.vllm
def test_vllm_loads_qcli_checkpoints(tmp_path):
    summary = tmp_path / "summary.json"
    env = dict(os.environ, QCLI_PYTHON=sys.executable)
    p = subprocess.run(
        [str(SCRIPT), "--json", str(summary)], env=env, capture_output=True, text=True
    )
    tail = (p.stdout + p.stderr)[-6000:]
    assert p.returncode == 0, tail
    rows = {r["name"]: r for r in json.loads(summary.read_text())["rows"]}
    # the "must show": W8A8 with --lm-head, untied and tied, lm_head runs int8 in vLLM
    for name in ("llama-untied-W8A8-lm", "llama-tied-W8A8-lm"):
        assert rows[name]["verdict"] == "ok", tail
        assert rows[name]["lm_head_scheme"].startswith("CompressedTensorsW8A8"), rows[name]
        assert rows[name]["linear_schemes"] == ["CompressedTensorsW8A8Int8"], rows[name]
    # and without --lm-head it stays dense
    assert rows["llama-tied-W8A8"]["lm_head_scheme"] == "dense"
    # the inputs people bring: a .bin-only Llama and a block-FP8 Qwen3 release (partial edge
    # blocks) quantized by qcli load in vLLM and match transformers
    derived = ("llama-bin-W8A8-lm", "llama-bin-FP8_DYNAMIC", "qwen3-fp8-W8A8", "qwen3-fp8-W8A8-lm")
    for name in derived:
        assert rows[name]["verdict"] == "ok", (name, rows[name].get("fails"), tail)
    # MoE with experts dense (attention quantized) loads and checks out; quantized experts
    # either run (AMX CPU, GPU) or say why not, as skipped rather than failed
    for model in ("qwen3-moe", "llama4-moe", "granitemoe"):
        for scheme in ("W8A8", "FP8_DYNAMIC"):
            dense = rows[f"{model}-{scheme}-experts-dense"]
            assert dense["verdict"].startswith("ok"), (dense["name"], dense.get("fails"))
            quantized = rows[f"{model}-{scheme}"]
            assert quantized["verdict"] == "ok" or quantized["verdict"].startswith("skipped"), (
                quantized["name"],
                quantized.get("error"),
            )
