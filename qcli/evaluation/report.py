"""What `qcli eval` measured, for people and scripts (``to_json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcli.evaluation.stats import Comparison
from qcli.evaluation.thresholds import EvalThresholds
from qcli.evaluation.windows import Windows


@dataclass
class EvalReport:
    checkpoint: Path
    reference: Path
    reference_origin: str
    scheme: str
    text: str  # where the text came from
    windows: Windows
    comparison: Comparison
    thresholds: EvalThresholds
    engines: dict[str, Any]
    cache: dict[str, Any]
    cpu: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        c = self.comparison
        return self.thresholds.failures(c.kld.mean, c.kld.p99, c.ln_ppl_ratio, c.top1_agreement)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "reference_checkpoint": {"path": str(self.reference), "origin": self.reference_origin},
            "scheme": self.scheme,
            "text": self.text,
            "windows": self.windows.to_json(),
            **self.comparison.to_json(),
            "thresholds": self.thresholds.to_json(),
            "ok": self.ok,
            "exit_code": self.exit_code,
            "failures": self.failures,
            "engines": self.engines,
            "reference_cache": self.cache,
            "cpu": self.cpu,
        }
