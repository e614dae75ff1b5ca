"""verify --e2e: both models in transformers, logits on fixed token ids (to be replaced by
`qcli eval`, which measures on real text with one model in memory at a time)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from qcli.errors import InputError
from qcli.jsondata import number

E2E_MAX_KL = 0.1  # mean KL(reference || quantized) of next-token distributions, nats
E2E_MIN_TOP1 = 0.9  # argmax agreement where the reference is confident
E2E_CONFIDENT_GAP = 1.0  # logit gap (nats) between the reference's top two tokens
E2E_MIN_CONFIDENT = 10  # fewer confident positions than this: top-1 is reported, not judged


def e2e(out: Path, reference: Path, seed: int = 0, tokens: int = 48) -> dict[str, Any]:
    """Load both models with transformers and compare their logits on fixed token ids.

    Top-1 agreement is judged only where the reference is confident (its top logit leads by
    E2E_CONFIDENT_GAP): a random or untrained model's flat logits flip their argmax under any
    noise, which says nothing about the checkpoint.
    """
    try:
        import transformers
    except ImportError:
        raise InputError("--e2e needs transformers (pip install 'qcli[test]')") from None

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def logits(path: Path) -> torch.Tensor:
        # compressed-tensors draws tqdm bars while (de)compressing: keep them off the report
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except Exception as e:  # transformers raises many types; the message is what matters
            raise InputError(
                f"--e2e: transformers cannot load {path}: {str(e).splitlines()[0]}"
            ) from None
        model.eval()
        vocab = model.config.get_text_config().vocab_size
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (2, tokens), generator=g)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return model(ids).logits.float().reshape(-1, vocab)  # decompresses here

    ref, got = logits(reference), logits(out)
    if ref.shape != got.shape:
        raise InputError(f"--e2e: logits of shape {list(got.shape)} vs {list(ref.shape)}")
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    agree = ref.argmax(-1) == got.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) >= E2E_CONFIDENT_GAP
    n_conf = int(confident.sum())
    conf_top1 = float(agree[confident].float().mean()) if n_conf else None
    failures = []
    if not kl <= E2E_MAX_KL:
        failures.append(f"logits KL {kl:.4f} > {E2E_MAX_KL} nats")
    if n_conf >= E2E_MIN_CONFIDENT and not conf_top1 >= E2E_MIN_TOP1:
        failures.append(
            f"top-1 agreement {conf_top1:.1%} < {E2E_MIN_TOP1:.0%} where the reference is"
            f" confident ({n_conf} positions)"
        )
    return {
        "loader": "transformers (compressed-tensors)",
        "positions": int(ref.shape[0]),
        "kl": number(kl),
        "top1_agreement": float(agree.float().mean()),
        "confident_positions": n_conf,
        "confident_top1_agreement": conf_top1,
        "thresholds": {
            "max_kl": E2E_MAX_KL,
            "min_confident_top1": E2E_MIN_TOP1,
            "confident_gap": E2E_CONFIDENT_GAP,
        },
        "ok": not failures,
        "failures": failures,
    }
