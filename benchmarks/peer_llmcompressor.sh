#!/usr/bin/env bash
# llm-compressor's data-free model_free_ptq, in its own venv outside the repo.
#
#   benchmarks/peer_llmcompressor.sh --setup                 # create the venv only
#   benchmarks/peer_llmcompressor.sh SRC OUT [W8A8|FP8_DYNAMIC|W8A16|FP8] [extra args]
#
# The venv (LLMC_VENV, default ~/.cache/qcli-bench/llmc-venv) gets the CPU torch first
# (torch==$LLMC_TORCH, so pip does not pull a CUDA build), then llmcompressor
# (LLMC_VERSION, default: latest). Extra args go to peer_llmcompressor.py
# (--ignore NAME ..., --max-workers N).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${LLMC_VENV:-$HOME/.cache/qcli-bench/llmc-venv}"
TORCH="${LLMC_TORCH:-2.13.0}"
SPEC="llmcompressor${LLMC_VERSION:+==$LLMC_VERSION}"

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import llmcompressor" 2>/dev/null; then
  echo "creating $VENV (torch==$TORCH, then $SPEC)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH"
  "$VENV/bin/pip" install -q "$SPEC"
fi

if [[ "${1:-}" == "--setup" ]]; then
  "$VENV/bin/pip" list 2>/dev/null | grep -iE '^(torch|llmcompressor|compressed-tensors|transformers) '
  exit 0
fi
if [[ $# -lt 2 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
SRC="$1" OUT="$2" SCHEME="${3:-W8A8}"
shift $(( $# < 3 ? $# : 3 ))
# No accelerator: model_free_ptq runs on the CPU; keep its log quiet but visible on error.
exec "$VENV/bin/python" "$HERE/peer_llmcompressor.py" "$SRC" "$OUT" --scheme "$SCHEME" --overwrite "$@"
