"""The plan, for people: each tensor's fate and the rule that decided it, and a summary."""

from __future__ import annotations

from collections import Counter

from rich import box
from rich.markup import escape
from rich.table import Table

from qcli.cli import fmt
from qcli.cli.output import Output
from qcli.cli.views.common import collapse, compile_filter
from qcli.planner import QUANTIZE, Plan, TensorPlan


def plan_table(
    plan: Plan, show_all: bool = False, pattern: str | None = None, wide: bool = True
) -> Table:
    """Each tensor's fate and the rule that decided it, bytes before and after.

    By default tensors that differ only in their layer index share one row ("layers 0-31"),
    so a 100-layer model fits a screen; `show_all` lists every tensor, `pattern` (a regex
    searched in tensor names) lists the matching ones. `wide`: stretch to the terminal.
    """
    table = Table(
        title=f"Plan: {plan.scheme.name} ({plan.scheme.format})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        expand=wide,  # column ratios apply only to an expanded table
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
    # Names are what people scan: three parts of the free width, the rule two.
    # (No min_width: rich crops the last column when the minimums overflow the console.)
    table.add_column("tensor", overflow="fold", ratio=3)
    table.add_column("kind", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("rule", ratio=2)
    table.add_column("size", justify="right", no_wrap=True)
    for members in groups:
        table.add_row(*_row(members))
    if not rows:
        table.add_row(f"[dim]no tensor matches {escape(repr(pattern))}[/]", "", "", "", "")
    return table


def _row(members: list[TensorPlan]) -> list[str]:
    """tensor, kind, action, rule, size (before → after) for tensors of one fate."""
    tp = members[0]
    name = collapse([m.source for m in members])[0].label if len(members) > 1 else tp.source
    if tp.outputs and tp.outputs[0].name != tp.source:
        name += f" → {tp.module}"
    rule = tp.rule + (f" — {tp.note}" if tp.note else "")
    action = "[green]quantize[/]" if tp.action == QUANTIZE else tp.action
    before = fmt.size(sum(m.bytes_in for m in members))
    after = fmt.size(sum(m.bytes_out for m in members))
    size = before if before == after else f"{before} → {after}"
    return [escape(name), tp.kind, action, escape(rule), size]


def plan_lines(plan: Plan) -> list[str]:
    """What the run does in a few lines (rich markup): modules, lm_head, size, fused groups."""
    counts = plan.counts()
    ratio = plan.bytes_in / plan.bytes_out if plan.bytes_out else 0
    lines = [
        f"[bold]{plan.scheme.name}[/] ({plan.scheme.format}): {len(plan.quantized)} Linear"
        f" modules quantized, {len(plan.dense_linear)} kept dense;"
        f" {counts.get('quantize', 0)} tensors quantized, {counts.get('copy', 0)} copied"
        + (f", {counts['dequantize']} decoded to dense" if counts.get("dequantize") else ""),
        f"lm_head: {escape(plan.head.summary())}",
        f"tensor data: {fmt.size(plan.bytes_in)} → {fmt.size(plan.bytes_out)}"
        + (f" ({ratio:.2f}× smaller)" if ratio >= 1 else f" ({1 / ratio:.2f}× larger)"),
    ]
    if plan.fused:
        shapes = Counter(
            "/".join(m.rpartition(".")[2] for m in g) if len(g) < 5 else f"{len(g)} experts"
            for g in plan.fused
        )
        parts = ", ".join(f"{k} ×{n}" for k, n in shapes.items())
        lines.append(f"fused groups (vLLM): {len(plan.fused)} ({parts}); all parts alike")
    if plan.dense_linear:
        shown = ", ".join(plan.dense_linear[:4]) + (" …" if len(plan.dense_linear) > 4 else "")
        lines.append(f"ignore (written to config): {escape(shown)}")
    return lines


def show_plan(out: Output, plan: Plan, table: bool, show_all: bool = False, pattern=None) -> None:
    """The plan as a result (inspect, --dry-run): the table, its summary, its warnings."""
    if table:
        out.result(plan_table(plan, show_all, pattern, wide=out.wide))
    out.result(*plan_lines(plan))
    for w in plan.warnings:
        out.warn(w)
