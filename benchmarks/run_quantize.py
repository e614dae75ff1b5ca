#!/usr/bin/env python3
"""Quantize wall time and peak memory, as ratios to `cp -r` measured in the same run.

For each candidate command (qcli quantize per scheme, plus any --extra command), every
round runs `cp -r SRC DST && sync` then the candidate (`... && sync`), so each candidate
run has a baseline run beside it (A B A B ...). Each run is timed by GNU time
(`/usr/bin/time -v`: wall clock and "Maximum resident set size", which covers the
command's whole process tree, i.e. the largest process in it). Before every run the
page cache is made the same for all: dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`,
needs root, SRC is then read from disk) or warmed (SRC read once to /dev/null, SRC is
then read from memory). Outputs are removed after every run, outside the timing.

Reported per candidate: median wall, ratio = median(candidate) / median(cp), the median
of the per-round ratios (robust to drift on a shared machine), peak RSS (median and max
over runs), output size, input GB/s. Markdown and JSON go to --results (stem) and stdout.

Examples:
    # qcli, both goal schemes, 3 pairs each, on the 2.3 GB checkpoint
    python benchmarks/run_quantize.py /root/bench/llama-2g --scheme W8A8 --scheme FP8_DYNAMIC \\
        --pairs 3 --work /root/bench/work --results benchmarks/results/2g
    # the peer side by side (its venv: benchmarks/peer_llmcompressor.sh --setup)
    python benchmarks/run_quantize.py /root/bench/llama-2g --scheme W8A8 --no-qcli \\
        --extra 'llmc=benchmarks/peer_llmcompressor.sh {src} {out} {scheme}'

Templates ({src}, {out}, {scheme}) are run with `bash -c`; `&& sync` is appended.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QCLI = "qcli quantize {src} {out} --scheme {scheme} --overwrite --quiet"
CP = "cp -r {src} {out}"
GNU_TIME = "/usr/bin/time"
SIMD = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_int8")


# ---------------------------------------------------------------- machine


def sh(cmd: str) -> str:
    try:
        return subprocess.run(
            cmd, shell=True, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except Exception:
        return ""


def machine_info(work: str) -> dict:
    lscpu = sh("lscpu")
    get = lambda k: (re.search(rf"^{k}:\s*(.*)$", lscpu, re.M) or [None, ""])[1].strip()  # noqa: E731
    flags = set(get("Flags").split())
    mem_kb = int((re.search(r"MemTotal:\s*(\d+)", open("/proc/meminfo").read()) or [0, 0])[1])
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": get("Model name"),
        "cpus": os.cpu_count(),
        "simd": " ".join(f for f in SIMD if f in flags),
        "mem_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "work_fs": sh(f"df -h --output=source,fstype,size,avail {shlex.quote(work)} | tail -1"),
        "qcli": sh("qcli --version 2>/dev/null || pip show qcli 2>/dev/null | grep -i ^version"),
        "qcli_git": sh(f"git -C {shlex.quote(HERE)} rev-parse --short HEAD 2>/dev/null")
        + ("+dirty" if sh(f"git -C {shlex.quote(HERE)} status --porcelain -- ../qcli") else ""),
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# ---------------------------------------------------------------- one run


def prepare_cache(mode: str, src: str) -> None:
    subprocess.run(["sync"], check=False)
    if mode == "drop":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    elif mode == "warm":
        for root, _, files in os.walk(src):
            for fn in files:
                with open(os.path.join(root, fn), "rb") as f:
                    while f.read(1 << 24):
                        pass


def parse_time_v(text: str) -> dict:
    def field(label: str) -> str | None:
        m = re.search(rf"^\s*{re.escape(label)}:\s*(.+)$", text, re.M)
        return m.group(1).strip() if m else None

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)") or "0:0"
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    return {
        "wall_s_time": secs,
        "user_s": float(field("User time (seconds)") or 0),
        "sys_s": float(field("System time (seconds)") or 0),
        "max_rss_kib": int(field("Maximum resident set size (kbytes)") or 0),
        "cpu_pct": (field("Percent of CPU this job got") or "").rstrip("%"),
        "exit": int(field("Exit status") or -1),
    }


def run_one(
    name: str,
    template: str,
    src: str,
    out: str,
    scheme: str,
    sync: str,
    cache: str,
    log_dir: str,
    idx: int,
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    prepare_cache(cache, src)
    cmd = template.format(src=shlex.quote(src), out=shlex.quote(out), scheme=scheme)
    full = (
        f"{cmd} && sync"
        if sync == "all"
        else f"{cmd} && find {shlex.quote(out)} -type f -exec sync {{}} +"
    )
    stem = f"{idx:03d}-" + re.sub(r"\W+", "_", f"{name}-{scheme}")
    tfile = os.path.join(log_dir, stem + ".time")
    efile = os.path.join(log_dir, stem + ".log")
    t0 = time.perf_counter()
    with open(efile, "w") as err:
        p = subprocess.run(
            [GNU_TIME, "-v", "-o", tfile, "bash", "-c", full], stdout=err, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - t0
    rec = {
        "name": name,
        "scheme": scheme,
        "cmd": full,
        "rc": p.returncode,
        "wall_s": wall,
        "out_bytes": dir_bytes(out) if os.path.isdir(out) else 0,
    }
    rec.update(parse_time_v(open(tfile).read()))
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode != 0:
        tail = open(efile).read()[-2000:]
        print(f"!! {name} [{scheme}] exited {p.returncode}; log {efile}:\n{tail}", file=sys.stderr)
    return rec


# ---------------------------------------------------------------- summary


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict], src_bytes: int) -> list[dict]:
    rows = []
    keys = []
    for r in runs:
        k = (r["name"], r["scheme"])
        if r["name"] != "cp" and k not in keys:
            keys.append(k)
    cp_all = [r for r in runs if r["name"] == "cp" and r["rc"] == 0]

    def row(name, scheme, rs, base, ratios):
        ok = [r for r in rs if r["rc"] == 0]
        walls = [r["wall_s"] for r in ok]
        rss = [r["max_rss_kib"] / 2**20 for r in ok]
        m = med(walls)
        return {
            "command": name,
            "scheme": scheme,
            "runs": len(ok),
            "failed": len(rs) - len(ok),
            "wall_median_s": m,
            "wall_min_s": min(walls, default=float("nan")),
            "wall_max_s": max(walls, default=float("nan")),
            "ratio_vs_cp": (m / med(base)) if base else None,
            "ratio_pairs_median": med(ratios) if ratios else None,
            "rss_median_gib": med(rss),
            "rss_max_gib": max(rss, default=float("nan")),
            "user_s_median": med([r["user_s"] for r in ok]),
            "sys_s_median": med([r["sys_s"] for r in ok]),
            "out_gb": (ok[0]["out_bytes"] / 1e9) if ok else float("nan"),
            "input_gb_per_s": (src_bytes / 1e9 / m) if walls else float("nan"),
        }

    rows.append(
        row("cp -r + sync", "-", cp_all, [r["wall_s"] for r in cp_all], [1.0] * len(cp_all))
    )
    for name, scheme in keys:
        rs = [r for r in runs if r["name"] == name and r["scheme"] == scheme]
        base = [
            r
            for r in runs
            if r["name"] == "cp" and r.get("pair_of") == (name, scheme) and r["rc"] == 0
        ]
        ratios = []
        for r in rs:
            b = next((c for c in base if c["round"] == r["round"]), None)
            if b and r["rc"] == 0:
                ratios.append(r["wall_s"] / b["wall_s"])
        rows.append(row(name, scheme, rs, [b["wall_s"] for b in base], ratios))
    return rows


def fmt(x, nd=2):
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.{nd}f}"


def markdown(info: dict, args, src_bytes: int, rows: list[dict]) -> str:
    lines = [
        f"### {os.path.basename(os.path.normpath(args.src))}: {src_bytes / 1e9:.2f} GB bf16, "
        f"{args.pairs} pair(s) per command, cache {args.cache_used}, sync {args.sync}",
        "",
        f"{info['date']} · {info['cpu_model']} ({info['simd']}) · {info['cpus']} CPUs · "
        f"{info['mem_gib']} GiB RAM · load {' '.join(info['loadavg'])} · {info['work_fs']} · "
        f"{info['qcli']} ({info['qcli_git']})",
        "",
        "| command | scheme | runs | wall median s (min-max) | x cp (medians) | x cp (pairs) "
        "| peak RSS GiB median (max) | out GB | in GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        failed = f"+{r['failed']} failed" if r["failed"] else ""
        lines.append(
            f"| {r['command']} | {r['scheme']} | {r['runs']}{failed} "
            f"| {fmt(r['wall_median_s'])} ({fmt(r['wall_min_s'])}-{fmt(r['wall_max_s'])}) "
            f"| {fmt(r['ratio_vs_cp'])} | {fmt(r['ratio_pairs_median'])} "
            f"| {fmt(r['rss_median_gib'], 3)} ({fmt(r['rss_max_gib'], 3)}) "
            f"| {fmt(r['out_gb'])} | {fmt(r['input_gb_per_s'])} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("src", help="checkpoint folder (benchmarks/make_checkpoint.py)")
    ap.add_argument("--scheme", action="append", help="repeatable; default W8A8")
    ap.add_argument(
        "--pairs", type=int, default=3, help="rounds of (cp, candidate); >= 3 for medians"
    )
    ap.add_argument(
        "--work", default="/root/bench/work", help="where outputs go (same fs as SRC is fairest)"
    )
    ap.add_argument("--no-qcli", action="store_true", help="do not run qcli quantize")
    ap.add_argument("--qcli-cmd", default=QCLI, help=f"template, default: {QCLI!r}")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=TEMPLATE",
        help="another command to compare, e.g. the peer (repeatable)",
    )
    ap.add_argument(
        "--cache",
        choices=["auto", "drop", "warm", "none"],
        default="auto",
        help="page cache before each run; auto: drop when writable, else warm",
    )
    ap.add_argument(
        "--sync",
        choices=["all", "files"],
        default="all",
        help="all: plain `sync` after each command; files: fsync only the output files",
    )
    ap.add_argument("--results", help="write STEM.md and STEM.json")
    args = ap.parse_args(argv)
    schemes = args.scheme or ["W8A8"]

    if not os.path.exists(GNU_TIME):
        print("GNU time missing: apt-get install -y time", file=sys.stderr)
        return 2
    cache = args.cache
    if cache == "auto":
        cache = "drop" if os.access("/proc/sys/vm/drop_caches", os.W_OK) else "warm"
    if cache == "drop":
        try:
            prepare_cache("drop", args.src)
        except OSError as e:
            print(f"cannot drop caches ({e}); warming SRC instead", file=sys.stderr)
            cache = "warm"
    args.cache_used = cache

    candidates = []  # (name, template, scheme)
    for s in schemes:
        if not args.no_qcli:
            candidates.append(("qcli quantize", args.qcli_cmd, s))
        for e in args.extra:
            name, _, tpl = e.partition("=")
            candidates.append((name, tpl, s))
    if not candidates:
        candidates.append(("cp -r (again)", CP, "-"))

    os.makedirs(args.work, exist_ok=True)
    log_dir = os.path.join(args.work, "logs-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(log_dir)
    src = os.path.abspath(args.src)
    src_bytes = dir_bytes(src)
    info = machine_info(args.work)
    print(f"{src}: {src_bytes / 1e9:.2f} GB; cache={cache}; logs in {log_dir}", file=sys.stderr)

    runs: list[dict] = []
    idx = 0
    for rnd in range(args.pairs):
        for name, tpl, scheme in candidates:
            for which, t in (("cp", CP), (name, tpl)):
                idx += 1
                out = os.path.join(args.work, "out-" + re.sub(r"\W+", "_", which))
                r = run_one(
                    which if which == "cp" else name,
                    t,
                    src,
                    out,
                    scheme,
                    args.sync,
                    cache,
                    log_dir,
                    idx,
                )
                r["round"] = rnd
                if which == "cp":
                    r["pair_of"] = (name, scheme)
                runs.append(r)
                print(
                    f"  round {rnd + 1}/{args.pairs} {r['name']:<16} {scheme:<12} "
                    f"{r['wall_s']:7.2f}s  rss {r['max_rss_kib'] / 2**20:6.3f} GiB  rc {r['rc']}",
                    file=sys.stderr,
                )

    rows = summarize(runs, src_bytes)
    md = markdown(info, args, src_bytes, rows)
    print(md)
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results + ".md", "w") as f:
            f.write(md)
        with open(args.results + ".json", "w") as f:
            json.dump(
                {
                    "machine": info,
                    "src": src,
                    "src_bytes": src_bytes,
                    "cache": cache,
                    "sync": args.sync,
                    "pairs": args.pairs,
                    "summary": rows,
                    "runs": [
                        {**r, "pair_of": list(r["pair_of"]) if "pair_of" in r else None}
                        for r in runs
                    ],
                },
                f,
                indent=1,
            )
        print(f"wrote {args.results}.md and .json", file=sys.stderr)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
