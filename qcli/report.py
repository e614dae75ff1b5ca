"""Output for people (rich tables and progress on stderr) and scripts (JSON on stdout).

Everything here renders data that other modules computed; nothing decides anything.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from qcli.plan import Plan

# People read stderr; stdout carries only JSON, so `qcli ... --json | jq` always works.
console = Console(stderr=True, highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    console.print(f"[bold red]qcli: error:[/] {message}", soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def plan_json(plan: Plan, detail: bool = True) -> dict[str, Any]:
    """The whole plan as data: the same decisions `quantize` executes."""
    ck = plan.checkpoint
    body: dict[str, Any] = {
        "source": str(ck.folder),
        "scheme": plan.scheme.name,
        "format": plan.scheme.format,
        "lm_head": plan.lm_head,
        "untie_lm_head": plan.untie,
        "counts": plan.counts(),
        "quantized_modules": len(plan.quantized),
        "dense_linear_modules": plan.dense_linear,
        "fused_groups": [list(g) for g in plan.fused],
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "targets": plan.config["quantization_config"]["config_groups"]["group_0"]["targets"],
        "ignore": plan.config["quantization_config"]["ignore"],
        "warnings": plan.warnings,
    }
    if detail:
        body["tensors"] = [
            {
                "name": tp.source,
                "module": tp.module,
                "kind": tp.kind,
                "action": tp.action,
                "rule": tp.rule,
                "bytes_in": tp.bytes_in,
                "bytes_out": tp.bytes_out,
                "outputs": [
                    {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in tp.outputs
                ],
                **({"note": tp.note} if tp.note else {}),
            }
            for tp in plan.tensors
        ]
    return body


def plan_table(plan: Plan, show_all: bool = False, pattern: str | None = None) -> Table:
    """Per-tensor decisions; by default quantized modules are summarized by rule, except
    lm_head and anything not decided by the common rule, which are always shown."""
    import re

    table = Table(title=f"Plan: {plan.scheme.name} ({plan.scheme.format})", title_justify="left")
    for col in ("tensor", "kind", "action", "rule", "before", "after"):
        table.add_column(col, justify="right" if col in ("before", "after") else "left")
    rx = re.compile(pattern) if pattern else None
    common = Counter((tp.action, tp.rule) for tp in plan.tensors).most_common(2)
    routine = {k for k, n in common if n > 8}
    hidden: Counter = Counter()
    for tp in plan.tensors:
        interesting = tp.module == "lm_head" or tp.note or (tp.action, tp.rule) not in routine
        if rx is not None and not rx.search(tp.source):
            continue
        if not (show_all or rx is not None or interesting):
            hidden[(tp.action, tp.rule)] += 1
            continue
        style = "green" if tp.action == "quantize" else None
        name = tp.source if tp.outputs[0].name == tp.source else f"{tp.source} → {tp.module}"
        table.add_row(
            name,
            tp.kind,
            f"[{style}]{tp.action}[/]" if style else tp.action,
            tp.rule + (f" — {tp.note}" if tp.note else ""),
            human_bytes(tp.bytes_in),
            human_bytes(tp.bytes_out),
        )
    for (action, rule), n in sorted(hidden.items()):
        table.add_row(f"[dim]… {n} more[/]", "", action, rule, "", "")
    return table


def print_plan_summary(plan: Plan) -> None:
    counts = plan.counts()
    ratio = plan.bytes_in / plan.bytes_out if plan.bytes_out else 0
    console.print(
        f"{plan.scheme.name}: {counts.get('quantize', 0)} tensors quantized,"
        f" {counts.get('copy', 0)} copied; lm_head [bold]{plan.lm_head}[/]"
        f"{' (untied from the embedding)' if plan.untie else ''};"
        f" {human_bytes(plan.bytes_in)} → {human_bytes(plan.bytes_out)} ({ratio:.2f}×)"
    )
    for w in plan.warnings:
        warn(w)


class byte_progress:  # noqa: N801  (used as a context manager, reads like a function)
    """A bytes progress bar on a terminal; a no-op when disabled or not a terminal."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.enabled = enabled and console.is_terminal
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n, name: None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("[dim]{task.fields[tensor]}"),
            console=console,
            transient=True,
        )
        self._progress.__enter__()
        task = self._progress.add_task("quantize", total=self.total, tensor="")

        def advance(n: int, name: str) -> None:
            self._progress.update(task, advance=n, tensor=name)

        return advance

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False
