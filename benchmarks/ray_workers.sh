#!/usr/bin/env bash
# `qcli quantize --ray` with one and with two local Ray workers, against `cp -r` and a plain
# `qcli quantize` in the same run (benchmarks/run_quantize.py: interleaved, /usr/bin/time -v,
# page cache dropped or warmed before every run).
#
#   benchmarks/ray_workers.sh SRC RESULTS_STEM [run_quantize.py options...]
#   benchmarks/ray_workers.sh /root/bench/llama-2g benchmarks/results/ray-2g --pairs 2
#
# One local cluster (127.0.0.1, --num-cpus 2, the machine's two cores) serves both Ray rows:
#   ray-1-worker   --workers 2: each task asks for both CPUs, so Ray runs one shard at a
#                  time, with qcli's two threads inside it;
#   ray-2-workers  --workers 1: two tasks at once, one shard and one thread each.
# Every row writes the same shards (--max-shard-size, so there are several to spread), and
# the same bytes as the plain run. Peak RSS is the driver's only: Ray's workers are not
# children of the timed command.
set -euo pipefail
src=${1:?SRC}
stem=${2:?RESULTS_STEM}
shift 2
here="$(cd "$(dirname "$0")" && pwd)"
port=${QCLI_BENCH_RAY_PORT:-6391}
addr="127.0.0.1:$port"
shard=${QCLI_BENCH_SHARD:-300MB}

ray start --head --node-ip-address 127.0.0.1 --port "$port" --num-cpus 2 \
    --include-dashboard false --disable-usage-stats >/dev/null
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT

# (--ray resumes a run it finds in OUT, so it takes no --overwrite; the harness removes every
# output after its run anyway)
q="qcli quantize {src} {out} --scheme {scheme} --max-shard-size $shard --quiet"
python "$here/run_quantize.py" "$src" \
    --qcli-cmd "$q --overwrite" \
    --extra "ray-1-worker=$q --ray --ray-address $addr --workers 2" \
    --extra "ray-2-workers=$q --ray --ray-address $addr --workers 1" \
    --results "$stem" "$@"
