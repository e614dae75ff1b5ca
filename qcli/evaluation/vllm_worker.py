"""Runs inside a Python that has vLLM (its own venv): one checkpoint, prompt log-probabilities.

    python vllm_worker.py CHECKPOINT --dtype float32 --ctx 512 --topk 20

Standalone on purpose: it imports vLLM (and json, sys), never qcli, so it runs in a venv where
only vLLM is installed. It prints one JSON line when the model is loaded ({"ready": ..., the
kernels vLLM picked}), then answers each line of stdin (a JSON list of token ids) with one
line: per position after the first, the prompt token's log-probability and vLLM's top-k.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--topk", type=int, default=20)
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    reply = sys.stdout
    sys.stdout = sys.stderr  # vLLM's chatter must not mix with the replies
    with contextlib.redirect_stdout(sys.stderr):
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(
            a.checkpoint,
            dtype=a.dtype,
            enforce_eager=True,
            distributed_executor_backend="uni",
            max_model_len=a.ctx + 1,
            max_logprobs=a.topk,
            seed=0,
        )
        kernels = _kernels(llm)
    params = SamplingParams(max_tokens=1, prompt_logprobs=a.topk, temperature=0.0)
    import vllm

    print(json.dumps({"ready": True, "vllm": vllm.__version__, **kernels}), file=reply, flush=True)
    for line in sys.stdin:
        ids = json.loads(line)
        with contextlib.redirect_stdout(sys.stderr):
            out = llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)[0]
        rows = []
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            top = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank else 1 << 30)
            rows.append(
                {
                    "target": entry[ids[pos]].logprob,
                    "ids": [t for t, _ in top[: a.topk]],
                    "logp": [lp.logprob for _, lp in top[: a.topk]],
                }
            )
        print(json.dumps(rows), file=reply, flush=True)
    return 0


def _kernels(llm) -> dict:
    """The linear method vLLM picked for the layers and for lm_head."""

    def probe(model):
        found, head = set(), None
        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if method is None:
                continue
            scheme = getattr(module, "scheme", None)
            kernel = type(getattr(scheme, "kernel", None) or method).__name__
            label = f"{type(scheme).__name__ if scheme else type(method).__name__} / {kernel}"
            if name.endswith("lm_head"):
                head = label
            elif "KVCache" not in label and "Embedding" not in label:
                found.add(label)
        return {"linear": sorted(found), "lm_head": head}

    try:
        return llm.apply_model(probe)[0]
    except Exception as e:  # noqa: BLE001 (only a description: never fail the run on it)
        return {"linear": [], "lm_head": None, "probe_error": str(e)[:200]}


if __name__ == "__main__":
    sys.exit(main())
