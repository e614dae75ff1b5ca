"""The two passes over the windows: the reference's (kept on disk), then the quantized one's,
scored against it token by token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from qcli.evaluation import cache as passes
from qcli.evaluation.cache import ReferencePass
from qcli.evaluation.stats import Comparison, kl_per_token, token_scores
from qcli.evaluation.vllm_engine import TopK, kl_lower_bound
from qcli.evaluation.windows import Windows

ProgressFn = Callable[[str, int, int], None]  # (pass, windows done, windows in all)
CHUNK_ROWS = 64  # positions compared at once (64 x vocab floats per temporary)


def reference_pass(
    source, folder: Path, wins: Windows, settings: dict, progress: ProgressFn | None
) -> tuple[ReferencePass, bool]:
    """The reference's log-probabilities of every scored position: from the cache when the
    same reference, windows and settings were scored before (then True), else computed and
    kept. `source`: a loaded engine model (left open), or a function that loads one (the
    model is then closed again before this returns: one model in memory at a time)."""
    digest = passes.key(folder, wins.windows, settings)
    found = passes.open_pass(digest)
    if found is not None:
        return found, True
    owned = not hasattr(source, "logprobs")
    model = source() if owned else source
    writer = passes.PassWriter(digest, model.vocab)
    try:
        for i, w in enumerate(wins.windows):
            found = model.scored(w, wins.first_scored)
            writer.add(found.pack() if isinstance(found, TopK) else found)
            del found  # a window of logits: not to be held while the next model loads
            if progress:
                progress("reference", i + 1, len(wins.windows))
        return writer.finish({"engine": model.describe()}), False
    except BaseException:
        writer.abort()
        raise
    finally:
        if owned:
            model.close()


def score(model, wins: Windows, base: ReferencePass, progress: ProgressFn | None) -> Comparison:
    """The loaded model's scores against the reference pass, window by window: exact KL from
    full distributions; a lower bound from vLLM's top-k (qcli.evaluation.vllm_engine)."""
    if model.vocab != base.vocab:
        raise ValueError(f"vocabulary of {model.vocab}, the reference's {base.vocab}")
    nll_ref, nll_q, kl, same = [], [], [], []
    for i, w in enumerate(wins.windows):
        logq = model.scored(w, wins.first_scored)
        if isinstance(logq, TopK):
            ref = TopK.unpack(base.read(i))
            nll_ref.append(-ref.target)
            nll_q.append(-logq.target)
            kl.append(kl_lower_bound(ref, logq))
            same.append(ref.ids[:, 0] == logq.ids[:, 0])
        else:
            _compare_dense(
                logq, base, i, torch.tensor(w[wins.first_scored :]), nll_ref, nll_q, kl, same
            )
        del logq  # no view of it may outlive the window: the next forward needs the room
        if progress:
            progress("quantized", i + 1, len(wins.windows))
    return Comparison.of(torch.cat(nll_ref), torch.cat(nll_q), torch.cat(kl), torch.cat(same))


def _compare_dense(logq, base, window, targets, nll_ref, nll_q, kl, same) -> None:
    """One window against the reference, a slice of rows at a time (the reference's rows are
    read a slice at a time too): temporaries stay at CHUNK_ROWS x vocab."""
    for r0 in range(0, logq.shape[0], CHUNK_ROWS):
        r1 = min(logq.shape[0], r0 + CHUNK_ROWS)
        logp, part = base.read(window, r0, r1), logq[r0:r1]
        a, top_p = token_scores(logp, targets[r0:r1])
        b, top_q = token_scores(part, targets[r0:r1])
        nll_ref.append(a)
        nll_q.append(b)
        kl.append(kl_per_token(logp, part))
        same.append(top_p == top_q)


def reference_pass_apart(
    folder: Path, wins: Windows, settings: dict, dtype: torch.dtype, progress: ProgressFn | None
) -> tuple[ReferencePass, bool]:
    """:func:`reference_pass` for transformers, run in a process of its own (python -m
    qcli.evaluation.refpass): when it exits, every byte the reference model took is the OS's
    again (a model freed in-process leaves its code, mapped files and malloc's free lists
    behind), so the quantized model loads into a process that never held another. Errors
    come back as the one-line errors they are."""
    import json
    import subprocess
    import sys

    from qcli.errors import InternalError, QcliError

    digest = passes.key(folder, wins.windows, settings)
    found = passes.open_pass(digest)
    if found is not None:
        return found, True
    job = {"folder": str(folder), "windows": wins.windows, "first": wins.first_scored,
           "bos": wins.bos, "ctx": wins.ctx, "settings": settings, "dtype": str(dtype)}  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-m", "qcli.evaluation.refpass"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin and child.stdout
    child.stdin.write(json.dumps(job))
    child.stdin.close()
    error = None
    for line in child.stdout:
        msg = json.loads(line)
        if msg[0] == "progress" and progress:
            progress(*msg[1:])
        elif msg[0] == "error":
            error = QcliError(msg[1])
            error.exit_code = msg[2]
    code = child.wait()
    if error is not None:
        raise error
    found = passes.open_pass(digest)
    if code != 0 or found is None:
        raise InternalError(f"the reference pass stopped (exit {code})")
    return found, False
