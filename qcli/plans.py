"""What a plan is: one decision per tensor (TensorPlan), lm_head's (HeadPlan), the whole
run's (Plan), and the options they come from. qcli.planner makes them; inspect, --dry-run,
convert, parts and verify read them. No torch and no tensor data here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qcli import kinds, rules
from qcli.dequant import Stored
from qcli.experts import Piece
from qcli.layout import Layout
from qcli.schemes import Scheme
from qcli.shards import Slot
from qcli.tensors import Checkpoint, TensorInfo

# DECODE: a weight the source stores in another form (quantized, or fused with other
# experts) written dense: decoded, not copied
QUANTIZE, COPY, DECODE = "quantize", "copy", "decode"
QUANTIZED, DENSE, ABSENT = "quantized", "dense", "absent"
# A source weight read through a decoder: a quantized release's, or a fused expert's piece.
Decoded = Stored | Piece


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for: scheme, targets, ignore, lm_head."""

    scheme: Scheme
    targets: Sequence[str] = rules.DEFAULT_TARGETS
    ignore: Sequence[str] = ()
    lm_head: bool = False
    default_ignore: bool = True
    # An entry that matches nothing is almost always a typo that would silently quantize (or
    # keep) the wrong layers, so it stops the run unless the user opts out.
    allow_unmatched: bool = False
    # Largest int8 magnitude written. 127 is full range; 63 keeps every pairwise u8*s8 sum
    # inside int16, so oneDNN's int8 GEMM on x86 CPUs without VNNI (vLLM's CPU W8A8 kernel)
    # cannot saturate, at the cost of one bit of weight precision.
    int8_max: int = 127


@dataclass(frozen=True)
class Quantizer:
    """How one weight is quantized and stored: all the executor needs besides the bytes."""

    qtype: str  # "int8" or "fp8" (qcli.quant)
    qmax: int | None  # largest int8 magnitude; None: the format's full range
    layout: Layout
    scale_dtype: str  # safetensors dtype of the stored scale
    shape: tuple[int, int]  # the dense weight's [out, in]


@dataclass
class TensorPlan:
    """The fate of one source tensor: which outputs it becomes and why."""

    source: str  # source tensor name
    info: TensorInfo  # where its bytes are
    action: str  # QUANTIZE or COPY
    module: str
    kind: str
    rule: str
    outputs: list[Slot]
    quantizer: Quantizer | None = None  # set exactly when action is QUANTIZE
    note: str = ""  # e.g. "untied from model.embed_tokens.weight"
    stored: Decoded | None = None  # a weight stored otherwise: decoded first (DECODE: only that)

    @property
    def bytes_in(self) -> int:
        return self.info.nbytes

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.source,
            "module": self.module,
            "kind": self.kind,
            "action": self.action,
            "rule": self.rule,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "outputs": [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.outputs
            ],
            **({"note": self.note} if self.note else {}),
        }


@dataclass(frozen=True)
class HeadPlan:
    """What happens to lm_head, in one place, so no two messages can disagree about it."""

    name: str | None
    state: str  # QUANTIZED, DENSE or ABSENT: what is written
    tied: bool  # the source config ties it to the embedding
    virtual: bool  # no lm_head tensors in the source
    untie: bool  # written quantized from the embedding table
    rule: str | None  # the rule that decided it
    embedding: str | None  # the embedding table's weight tensor

    def why(self) -> str | None:
        """The rule that decided it; for a tied head left dense, the tie."""
        if self.virtual and self.state == DENSE:
            return "tied to the input embedding: no lm_head tensor, loaders reuse the embedding"
        return self.rule

    def summary(self) -> str:
        """What was (or will be) written for lm_head, in one sentence."""
        if self.state == ABSENT:
            return "none (the model has no output head)"
        if self.untie:
            return (
                f"quantized from the tied embedding table {self.embedding} (the embedding stays"
                " dense; tie_word_embeddings set to false, since vLLM would drop a tied"
                " lm_head's scale)"
            )
        if self.state == QUANTIZED:
            tie = "; the config tied it: tie_word_embeddings set to false" if self.tied else ""
            return f"quantized — {self.rule}{tie}"
        if self.virtual:
            return "dense: tied to the embedding table (no lm_head tensors to quantize)"
        if self.tied:
            return (
                f"dense — {self.rule}; the config ties it, so loaders use the embedding table"
                f" and skip {self.name}.weight"
            )
        return f"dense — {self.rule}"


@dataclass
class Plan:
    checkpoint: Checkpoint
    options: PlanOptions
    modules: dict[str, kinds.Module]
    tensors: list[TensorPlan]
    quantized: list[str]  # module names, natural order
    dense_linear: list[str]  # Linear modules kept dense (written to `ignore`)
    head: HeadPlan
    config: dict[str, Any]  # the output config.json
    fused: list[tuple[str, ...]]
    warnings: list[str] = field(default_factory=list)

    @property
    def scheme(self) -> Scheme:
        return self.options.scheme

    @property
    def lm_head(self) -> str:
        return self.head.state

    @property
    def untie(self) -> bool:
        return self.head.untie

    @property
    def bytes_in(self) -> int:
        return self.checkpoint.total_bytes

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)

    def counts(self) -> dict[str, int]:
        return dict(Counter(t.action for t in self.tensors))

    def to_json(self, detail: bool = True) -> dict[str, Any]:
        """The whole plan as data: the same decisions `quantize` executes."""
        qc = self.config["quantization_config"]
        opts = self.options
        body: dict[str, Any] = {
            "source": str(self.checkpoint.folder),
            "scheme": self.scheme.name,
            "format": self.scheme.format,
            "options": {
                "targets": list(opts.targets),
                "ignore": list(opts.ignore),
                "lm_head": opts.lm_head,
                "default_ignore": opts.default_ignore,
                "allow_unmatched": opts.allow_unmatched,
            },
            "lm_head": self.lm_head,
            "lm_head_rule": self.head.why(),
            "lm_head_summary": self.head.summary(),
            "tied_embeddings": self.head.tied,
            "untie_lm_head": self.untie,
            "counts": self.counts(),
            "quantized_modules": len(self.quantized),
            "dense_linear_modules": self.dense_linear,
            "fused_groups": [list(g) for g in self.fused],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "ratio": round(self.bytes_in / self.bytes_out, 3) if self.bytes_out else None,
            "targets": qc["config_groups"]["group_0"]["targets"],
            "ignore": qc["ignore"],
            "warnings": self.warnings,
        }
        if detail:
            body["quantized_module_names"] = self.quantized
            body["quantization_config"] = qc
            body["tensors"] = [tp.to_json() for tp in self.tensors]
        return body
