"""Output for people (rich tables and progress on stderr) and scripts (JSON on stdout).

Everything here renders data that other modules computed; nothing decides anything.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from qcli.contract import Contract
    from qcli.plan import Plan, TensorPlan

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
    from qcli import kinds

    ck = plan.checkpoint
    qc = plan.config["quantization_config"]
    body: dict[str, Any] = {
        "source": str(ck.folder),
        "scheme": plan.scheme.name,
        "format": plan.scheme.format,
        "options": {
            "targets": list(plan.options.targets),
            "ignore": list(plan.options.ignore),
            "lm_head": plan.options.lm_head,
            "default_ignore": plan.options.default_ignore,
            "allow_unmatched": plan.options.allow_unmatched,
        },
        "lm_head": plan.lm_head,
        "lm_head_rule": _lm_head_rule(plan),
        "tied_embeddings": kinds.tied_embeddings(ck.config or {}),
        "untie_lm_head": plan.untie,
        "counts": plan.counts(),
        "quantized_modules": len(plan.quantized),
        "dense_linear_modules": plan.dense_linear,
        "fused_groups": [list(g) for g in plan.fused],
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "ratio": round(plan.bytes_in / plan.bytes_out, 3) if plan.bytes_out else None,
        "targets": qc["config_groups"]["group_0"]["targets"],
        "ignore": qc["ignore"],
        "warnings": plan.warnings,
    }
    if detail:
        body["quantized_module_names"] = plan.quantized
        body["quantization_config"] = qc
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


def _lm_head_rule(plan: Plan) -> str | None:
    """Why lm_head ends up as it does: the rule that decided its tensor, or the tie."""
    heads = {m.name for m in plan.modules.values() if m.role == "lm_head"} or {"lm_head"}
    for tp in plan.tensors:
        if tp.module in heads and tp.kind == "Linear":
            return tp.rule
    if plan.lm_head == "dense":
        return "tied to the input embedding: no lm_head tensor, loaders reuse the embedding"
    return None


def plan_table(plan: Plan, show_all: bool = False, pattern: str | None = None) -> Table:
    """Each tensor's fate and the rule that decided it, bytes before and after.

    By default tensors that differ only in their layer index share one row ("layers 0-31"),
    so a 100-layer model fits a screen; `show_all` lists every tensor, `pattern` (a regex
    searched in tensor names) lists the matching ones.
    """
    from rich.markup import escape

    from qcli.inspect import collapse

    table = Table(
        title=f"Plan: {plan.scheme.name} ({plan.scheme.format})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        expand=True,  # column ratios apply only to an expanded table
    )
    rx = compile_filter(pattern) if pattern else None
    rows = [tp for tp in plan.tensors if rx is None or rx.search(tp.source)]
    by_name: dict[str, list[TensorPlan]] = {}
    for tp in rows:
        by_name.setdefault(tp.source, []).append(tp)
    if show_all or rx is not None:
        groups = [[tp] for tp in rows]
    else:
        # one row per (layer pattern, kind, action, rule): same fate, same reason
        keyed: dict[tuple[str, str, str, str], list[TensorPlan]] = {}
        for c in collapse(list(by_name)):
            for name in c.names:
                for tp in by_name[name]:
                    keyed.setdefault((c.pattern, tp.kind, tp.action, tp.rule), []).append(tp)
        groups = list(keyed.values())
    cells = [_plan_row(plan, members) for members in groups]
    # Names are what people scan: three parts of the free width, the rule two.
    # (No min_width: rich crops the last column when the minimums overflow the console.)
    table.add_column("tensor", overflow="fold", ratio=3)
    table.add_column("kind", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("rule", ratio=2)
    table.add_column("size", justify="right", no_wrap=True)
    for name, *rest in cells:
        table.add_row(escape(name), *rest)
    if not rows:
        table.add_row(f"[dim]no tensor matches {escape(repr(pattern))}[/]", "", "", "", "")
    return table


def _plan_row(plan: Plan, members: list[TensorPlan]) -> list[str]:
    """tensor, layers, kind, action, rule, size (before → after) for tensors of one fate."""
    from rich.markup import escape

    from qcli.inspect import collapse

    tp = members[0]
    name = collapse([m.source for m in members])[0].label if len(members) > 1 else tp.source
    if tp.outputs and tp.outputs[0].name != tp.source:
        name += f" → {tp.module}"
    rule = tp.rule
    module = plan.modules.get(tp.module)
    if (
        tp.action == "copy"
        and tp.module in plan.quantized
        and module
        and tp.source != module.weight
    ):
        # e.g. a bias: its module is quantized, the tensor itself is copied as is
        rule = f"{tp.source.rpartition('.')[2]} of a quantized module: copied"
    if tp.note:
        rule += f" — {tp.note}"
    action = "[green]quantize[/]" if tp.action == "quantize" else tp.action
    before = short_bytes(sum(m.bytes_in for m in members))
    after = short_bytes(sum(m.bytes_out for m in members))
    size = before if before == after else f"{before} → {after}"
    return [name, tp.kind, action, escape(rule), size]


def short_bytes(n: float) -> str:
    """Three significant digits ("131 KB", "66.6 KB", "1.21 GB"): table cells stay narrow."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 99.95 else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def compile_filter(pattern: str) -> re.Pattern[str]:
    """A --filter regex, or a one-line InputError."""
    from qcli.errors import InputError

    try:
        return re.compile(pattern)
    except re.error as e:
        raise InputError(f"invalid --filter regular expression {pattern!r}: {e}") from None


def print_plan_summary(plan: Plan) -> None:
    """What the run does in a few lines: modules, lm_head, size, fused groups, warnings."""
    from rich.markup import escape

    from qcli import kinds

    counts = plan.counts()
    ratio = plan.bytes_in / plan.bytes_out if plan.bytes_out else 0
    dense = len(plan.dense_linear)
    console.print(
        f"[bold]{plan.scheme.name}[/] ({plan.scheme.format}): {len(plan.quantized)} Linear"
        f" modules quantized, {dense} kept dense; {counts.get('quantize', 0)} tensors"
        f" quantized, {counts.get('copy', 0)} copied"
    )
    rule = _lm_head_rule(plan)
    console.print(
        f"lm_head: [bold]{plan.lm_head}[/]"
        + (" (untied: written quantized from the embedding)" if plan.untie else "")
        + (f" — {escape(rule)}" if rule and not plan.untie else "")
    )
    console.print(
        f"size: {human_bytes(plan.bytes_in)} → {human_bytes(plan.bytes_out)}"
        f" (estimated; {ratio:.2f}× smaller)"
    )
    if plan.fused:
        shapes = Counter(
            "/".join(m.rpartition(".")[2] for m in g) if len(g) < 5 else f"{len(g)} experts"
            for g in plan.fused
        )
        parts = ", ".join(f"{k} ×{n}" for k, n in shapes.items())
        console.print(f"fused groups (vLLM): {len(plan.fused)} ({parts}); all parts alike")
    if kinds.tied_embeddings(plan.checkpoint.config or {}) and not plan.untie:
        console.print("tied embeddings: lm_head stays tied to the dense embedding table")
    if plan.dense_linear:
        shown = ", ".join(plan.dense_linear[:4]) + (" …" if len(plan.dense_linear) > 4 else "")
        console.print(f"ignore (written to config): {escape(shown)}")
    for w in plan.warnings:
        warn(escape(w))


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


def findings_table(contract: Contract) -> Table | None:
    """The contract findings, errors first, each with what a loader will do; None if none."""
    from rich import box
    from rich.markup import escape

    from qcli.contract import sorted_findings

    found = sorted_findings(contract.findings)
    if not found:
        return None
    errors = len(contract.errors)
    table = Table(
        title=f"Contract: {errors} error(s), {len(found) - errors} warning(s)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("", "subject", "problem", "what a loader does"):
        table.add_column(col)
    for f in found:
        mark = "[red]error[/]" if f.severity == "error" else "[yellow]warning[/]"
        table.add_row(mark, escape(f.subject), escape(f.problem), escape(f.consequence))
    return table
