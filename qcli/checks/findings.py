"""What the checks report: findings, and what they learned for the numeric checks.

Every finding names the config key or tensor and what a real loader does with it, because
"verify failed" is only useful when it says why the output would be garbage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qcli.layout import Layout
from qcli.schemes import Scheme
from qcli.tensors import TensorInfo, natural_key

ERROR, WARNING = "error", "warning"

# Consequences shared by several findings.
READ_AS_FLOAT = "transformers will read the stored int8/fp8 values as float weights (garbage)"
# What transformers 5.24 / compressed-tensors 0.20 do, checked by tests/interop.
NAN_LOGITS = (
    "transformers finds no scale and leaves it uninitialized: garbage or NaN logits;"
    " vLLM fails to load it"
)


@dataclass(frozen=True)
class Finding:
    """One broken (error) or risky (warning) part of the contract, and what a loader does."""

    check: str  # a stable short id, e.g. "config.format", "tensors.scale"
    subject: str  # the config key, tensor or module it is about
    problem: str
    consequence: str
    severity: str = ERROR

    def __str__(self) -> str:
        return f"{self.subject}: {self.problem}; {self.consequence}"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class QuantModule:
    """A quantized Linear whose tensors match its scheme: what the numeric checks need."""

    name: str
    role: str | None
    group: str
    scheme: Scheme
    weight: TensorInfo  # `.weight` (int8 / fp8) or `.weight_packed` (int32)
    scale: TensorInfo
    shape: tuple[int, int]  # the dense weight's [out, in]

    @property
    def layout(self) -> Layout:
        return self.scheme.layout


@dataclass
class LmHead:
    """How each loader will treat lm_head."""

    name: str | None
    on_disk: str  # "quantized", "dense", "absent"
    tied: bool  # the config ties it to the input embedding
    transformers: bool  # quantized in transformers (class Linear matches it)
    vllm: bool  # quantized in vLLM (only a name or regex matches ParallelLMHead)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Contract:
    findings: list[Finding] = field(default_factory=list)
    modules: list[QuantModule] = field(default_factory=list)
    lm_head: LmHead | None = None
    dense_linear: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(
        self, check: str, subject: str, problem: str, consequence: str, severity: str = ERROR
    ) -> None:
        self.findings.append(Finding(check, subject, problem, consequence, severity))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.findings) - len(self.errors),
            "findings": [f.to_json() for f in self.findings],
            "quantized_modules": len(self.modules),
            "dense_linear_modules": self.dense_linear,
            "lm_head": self.lm_head.to_json() if self.lm_head else None,
        }


def sorted_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Errors first, then by subject in natural order (layers.10 after layers.9)."""
    return sorted(findings, key=lambda f: (f.severity != ERROR, natural_key(f.subject)))
