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
        logp = base.read(i)
        if isinstance(logq, TopK):
            ref = TopK.unpack(logp)
            a, b, top_p, top_q = -ref.target, -logq.target, ref.ids[:, 0], logq.ids[:, 0]
            kl.append(kl_lower_bound(ref, logq))
        else:
            targets = torch.tensor(w[wins.first_scored :])
            a, top_p = token_scores(logp, targets)
            b, top_q = token_scores(logq, targets)
            kl.append(kl_per_token(logp, logq))
        nll_ref.append(a)
        nll_q.append(b)
        same.append(top_p == top_q)
        if progress:
            progress("quantized", i + 1, len(wins.windows))
    return Comparison.of(torch.cat(nll_ref), torch.cat(nll_q), torch.cat(kl), torch.cat(same))
