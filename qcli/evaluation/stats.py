"""Perplexity and KL divergence over scored tokens, with their uncertainty.

Per scored token t (positions where both models predict the same next token):

* ``nll_t = -log p(token_t)`` for each model; ``PPL = exp(mean nll)``, and its standard error
  by the delta method, ``PPL * std(nll) / sqrt(n)``;
* ``ln(PPL_q / PPL_ref) = mean(nll_q - nll_ref)``, with the standard error of that paired
  mean (the per-token differences are far less noisy than either model's nll);
* ``KL_t = sum_v p_ref(v) (log p_ref(v) - log p_q(v))``, the divergence of the quantized
  model's next-token distribution from the reference's: mean +- standard error, median, p90,
  p99 and max (what llama.cpp's `perplexity --kl-divergence` reports);
* top-1 agreement: the share of tokens where both models' most likely next token is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qcli.jsondata import number


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    stderr: float
    mean_nll: float
    tokens: int

    @classmethod
    def of(cls, nll: torch.Tensor) -> Perplexity:
        n = nll.numel()
        mean = float(nll.double().mean())
        sd = float(nll.double().std()) if n > 1 else 0.0
        ppl = math.exp(mean)
        return cls(ppl, ppl * sd / math.sqrt(n), mean, n)

    def to_json(self) -> dict:
        return {
            "ppl": number(self.ppl),
            "ppl_stderr": number(self.stderr),
            "mean_nll": number(self.mean_nll),
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class Divergence:
    mean: float
    stderr: float
    median: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, kl: torch.Tensor) -> Divergence:
        k = kl.double()
        n = k.numel()
        q = torch.quantile(k, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
        sd = float(k.std()) if n > 1 else 0.0
        return cls(float(k.mean()), sd / math.sqrt(n), *(float(v) for v in q), float(k.max()))

    def to_json(self) -> dict:
        return {
            k: number(getattr(self, k)) for k in ("mean", "stderr", "median", "p90", "p99", "max")
        }


@dataclass(frozen=True)
class Comparison:
    reference: Perplexity
    quantized: Perplexity
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    kld: Divergence
    top1_agreement: float
    tokens: int

    @classmethod
    def of(
        cls,
        nll_ref: torch.Tensor,
        nll_q: torch.Tensor,
        kl: torch.Tensor,
        same_top1: torch.Tensor,
    ) -> Comparison:
        diff = nll_q.double() - nll_ref.double()
        n = diff.numel()
        sd = float(diff.std()) if n > 1 else 0.0
        return cls(
            Perplexity.of(nll_ref),
            Perplexity.of(nll_q),
            float(diff.mean()),
            sd / math.sqrt(n),
            Divergence.of(kl),
            float(same_top1.double().mean()),
            n,
        )

    def to_json(self) -> dict:
        return {
            "reference": self.reference.to_json(),
            "quantized": self.quantized.to_json(),
            "ln_ppl_ratio": number(self.ln_ppl_ratio),
            "ln_ppl_ratio_stderr": number(self.ln_ppl_ratio_stderr),
            "kld": self.kld.to_json(),
            "top1_agreement": number(self.top1_agreement),
            "tokens": self.tokens,
        }


def token_scores(logp: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll of each target, argmax) from log-probabilities ``[n, vocab]``."""
    nll = -logp.gather(1, targets.reshape(-1, 1)).reshape(-1)
    return nll, logp.argmax(dim=1)


def kl_per_token(logp_ref: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """``sum_v p_ref (log p_ref - log p_q)`` per row, in float64 sums; 0 where p_ref is 0."""
    p = logp_ref.exp()
    terms = (logp_ref - logp_q).mul_(p)
    terms.masked_fill_(p == 0, 0.0)  # 0 * (-inf - x) is 0, not nan
    return terms.sum(dim=1, dtype=torch.float64).clamp_(min=0.0)
