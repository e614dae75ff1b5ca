#!/usr/bin/env python3
"""Run llm-compressor's data-free `model_free_ptq` on a local checkpoint folder.

Runs inside llm-compressor's own venv (see peer_llmcompressor.sh, which creates it).
Same presets as qcli (compressed-tensors preset names: W8A8, FP8_DYNAMIC, W8A16, FP8),
same work as qcli by default: every Linear weight quantized, lm_head left bf16.
model_free_ptq has no model definition: it quantizes every 2-D `*.weight` whose name is
not ignored (norms are skipped), so model.embed_tokens must be ignored explicitly (its
own README does the same), or it quantizes the embedding too.

    python peer_llmcompressor.py SRC OUT --scheme W8A8 [--ignore NAME ...] [--max-workers 1]
"""

import argparse
import os
import shutil
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--scheme", default="W8A8")
    ap.add_argument(
        "--ignore", action="append", help="repeatable; default: lm_head, model.embed_tokens"
    )
    ap.add_argument("--max-workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    ignore = a.ignore if a.ignore is not None else ["lm_head", "model.embed_tokens"]
    if os.path.exists(a.out):
        if not a.overwrite:
            print(f"{a.out} exists (use --overwrite)", file=sys.stderr)
            return 2
        shutil.rmtree(a.out)

    t0 = time.perf_counter()
    import llmcompressor
    from llmcompressor import model_free_ptq

    t1 = time.perf_counter()
    model_free_ptq(
        model_stub=a.src,
        save_directory=a.out,
        scheme=a.scheme,
        ignore=ignore,
        max_workers=a.max_workers,
        device=a.device,
    )
    t2 = time.perf_counter()
    print(
        f"llmcompressor {llmcompressor.__version__}: model_free_ptq(scheme={a.scheme!r}, "
        f"ignore={ignore!r}, max_workers={a.max_workers}, device={a.device!r}) "
        f"import {t1 - t0:.1f}s, run {t2 - t1:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
