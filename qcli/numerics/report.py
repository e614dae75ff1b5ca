"""Everything verify found, for people and for scripts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcli.checks import Contract
from qcli.jsondata import number
from qcli.numerics.activations import FAST_TOKENS
from qcli.numerics.layers import EXACT, INEXACT, ROUNDING, LayerResult, VerifyOptions
from qcli.numerics.reference import Reference
from qcli.numerics.thresholds import DEQUANTIZED, REFERENCE


@dataclass
class Report:
    """Everything verify found: contract findings and per-layer numbers."""

    checkpoint: Path
    contract: Contract
    reference: Reference | None
    reference_note: str | None  # why no reference was used, when none was
    options: VerifyOptions
    layers_filter: str | None = None
    layers: list[LayerResult] = field(default_factory=list)
    cpu: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.contract.ok and all(r.ok for r in self.layers)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def kernels(self) -> dict[str, dict[str, Any]]:
        """Per scheme: which kernel ran, and how it compared with exact arithmetic."""
        out: dict[str, dict[str, Any]] = {}
        rank = {EXACT: 0, ROUNDING: 1, INEXACT: 2}
        for r in self.layers:
            k = out.setdefault(r.scheme, {"kernels": [], "check": EXACT, "max_dev": 0.0})
            if r.kernel not in k["kernels"]:
                k["kernels"].append(r.kernel)
            if rank[r.kernel_check] > rank[k["check"]]:
                k["check"] = r.kernel_check
            k["max_dev"] = max(k["max_dev"], r.kernel_dev)
        return out

    def to_json(self) -> dict[str, Any]:
        head = [r for r in self.layers if r.role == "lm_head"]
        failed = [r for r in self.layers if not r.ok]
        return {
            "checkpoint": str(self.checkpoint),
            "ok": self.ok,
            "exit_code": self.exit_code,
            "reference": (
                {"path": str(self.reference.folder), "origin": self.reference.origin}
                if self.reference
                else None
            ),
            "reference_note": self.reference_note,
            "compared_with": REFERENCE if self.reference else DEQUANTIZED,
            "options": {
                "fast": self.options.fast,
                "tokens": list(FAST_TOKENS if self.options.fast else self.options.tokens),
                "seed": self.options.seed,
                "layers": self.layers_filter,
            },
            "cpu": self.cpu,
            "kernels": {
                k: {**v, "max_dev": number(v["max_dev"])} for k, v in self.kernels().items()
            },
            "contract": self.contract.to_json(),
            "findings": [f.to_json() for f in self.contract.findings],
            "summary": {
                "layers": len(self.layers),
                "failed_layers": [r.module for r in failed],
                "min_sqnr_db": number(min((r.sqnr_db for r in self.layers), default=None)),
            },
            "lm_head": head[0].to_json() if head else None,
            "layers": [r.to_json() for r in self.layers],
        }
