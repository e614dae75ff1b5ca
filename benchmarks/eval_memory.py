"""Peak memory of `qcli eval` next to one model and two, measured in the same run.

    python benchmarks/eval_memory.py [--work DIR] [--max-tokens 1022] [--json FILE]

Every figure is `/usr/bin/time -v`'s maximum resident set size of a fresh process:
- one model: transformers loads the dense reference and scores one window (the floor any
  evaluation has: a model and a window's logits);
- two models: the same with the quantized model loaded beside it (what holding both at once,
  as `verify --e2e` did, costs);
- qcli eval: the reference pass (written to a fresh cache) and the quantized pass.
The claim: qcli eval's peak is close to one model's, not two.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_ONE_WINDOW = """
import sys, torch
from transformers import AutoModelForCausalLM
models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in sys.argv[1:]]
ids = torch.randint(0, 1000, (1, 512))
with torch.no_grad():
    for m in models:
        torch.log_softmax(m(ids).logits.float(), -1)
"""


def peak_rss(cmd: list[str], env: dict | None = None) -> tuple[int, float]:
    """(max RSS in bytes, wall seconds) of `cmd` under /usr/bin/time -v."""
    r = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env or os.environ
    )
    if r.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x or 0) for x in wall.groups())
    return kb * 1024, h * 3600 + m * 60 + s


def main() -> int:
    from tests.real_models import smollm2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qcli-eval-mem")
    ap.add_argument("--max-tokens", type=int, default=1022)
    ap.add_argument("--scheme", default="W8A8")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    src = smollm2(skip=False)
    out = a.work / a.scheme
    qcli = [sys.executable, "-c", "from qcli.cli.app import run; run()"]
    if not out.exists():
        subprocess.run([*qcli, "quantize", src, out, "-s", a.scheme, "-q"], check=True)
    one, _ = peak_rss([sys.executable, "-c", _ONE_WINDOW, str(src)])
    two, _ = peak_rss([sys.executable, "-c", _ONE_WINDOW, str(src), str(out)])
    env = {**os.environ, "QCLI_CACHE_DIR": str(a.work / "cache")}  # a cold cache: both passes
    subprocess.run(["rm", "-rf", str(a.work / "cache")], check=True)
    ev, wall = peak_rss([*qcli, "eval", str(out), "-q", "--max-tokens", str(a.max_tokens)], env=env)
    result = {
        "model": "SmolLM2-135M-Instruct",
        "scheme": a.scheme,
        "tokens": a.max_tokens,
        "peak_rss_one_model": one,
        "peak_rss_two_models": two,
        "peak_rss_qcli_eval": ev,
        "qcli_eval_seconds": wall,
        "eval_over_one": round(ev / one, 3),
        "eval_over_two": round(ev / two, 3),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
