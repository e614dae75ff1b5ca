"""The verify report for people: reference, contract findings, the worst layers, kernels."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from qcli.cli import fmt
from qcli.cli.output import Output
from qcli.cli.views.common import findings_table
from qcli.numerics import LayerResult, Report

TABLE_ROWS = 20  # layers shown by default: the worst ones, plus lm_head


def show_report(out: Output, r: Report, show_all: bool) -> None:
    """The report for people: reference, contract, layers, kernels, verdict."""
    if r.reference is not None:
        out.result(f"reference: {escape(str(r.reference.folder))} ({r.reference.origin})")
    elif r.reference_note:
        out.result(f"[dim]reference: {escape(r.reference_note)}[/]")

    table = findings_table(r.contract)
    if table is not None:
        out.result(table)
    else:
        out.result("contract: [green]ok[/]")

    if r.layers:
        out.result(_layer_table(r, show_all))
        for scheme, k in r.kernels().items():
            dev = fmt.num(k["max_dev"], ".1e")
            verdict = {
                "exact": "bit-exact against exact integer math",
                "float rounding": f"within float32 rounding of exact math ({dev} of the range)",
            }.get(
                k["check"],
                f"[red]INEXACT[/]: off by {dev} of the output's range on this CPU — the kernel's"
                " fault, not the checkpoint's; the verdict uses exact math",
            )
            out.result(f"{scheme}: {escape(', '.join(k['kernels']))} — {verdict}")
        notes = sorted({n for layer in r.layers for n in layer.notes if "tied" not in n})
        for n in notes[:5]:
            out.result(f"[dim]note: {escape(n)}[/]")
    if r.cpu.get("int8_may_saturate"):
        out.result(
            "[yellow]this CPU has no VNNI/AMX: x86 int8 GEMMs (vLLM's oneDNN path) saturate"
            " here for full-range int8 weights; verify computed exact integer math instead, so"
            " the numbers above judge the checkpoint, not this CPU's kernel[/]"
        )
    failed = [layer for layer in r.layers if not layer.ok]
    if r.ok:
        out.result(
            f"[green]verify: ok[/] — contract holds, {len(r.layers)} layer(s) within their"
            " thresholds"
        )
    else:
        parts = []
        if r.contract.errors:
            parts.append(f"{len(r.contract.errors)} contract error(s)")
        if failed:
            parts.append(f"{len(failed)} layer(s) out of bounds")
        out.result(f"[bold red]verify: FAILED[/] — {', '.join(parts)}")


def _layer_table(r: Report, show_all: bool) -> Table:
    ordered = sorted(r.layers, key=lambda x: (x.ok, x.margin()))
    shown = ordered if show_all else ordered[:TABLE_ROWS]
    heads = [x for x in ordered if x.role == "lm_head" and x not in shown]
    shown = shown + heads  # lm_head is always shown
    mode = "reference" if r.reference else "dequantized weights"
    table = Table(
        title=f"Layers vs {mode}, worst first ({len(shown)} of {len(r.layers)})",
        title_justify="left",
    )
    schemes = len({x.scheme for x in r.layers}) > 1
    table.add_column("layer", overflow="fold", ratio=3)
    if schemes:
        table.add_column("scheme")
    for col in ("SQNR dB", "cosine", "max rel", "worst channel"):
        table.add_column(col, justify="right")
    table.add_column("kernel")
    table.add_column("", overflow="fold", ratio=2)
    for x in shown:
        row = _layer_row(x)
        table.add_row(*(row if schemes else row[:1] + row[2:]))
    hidden = len(r.layers) - len(shown)
    if hidden:
        table.add_row(f"[dim]… {hidden} more (--all)[/]")
    return table


def _layer_row(x: LayerResult) -> list[str]:
    status = "[green]ok[/]" if x.ok else "[red]" + escape("; ".join(x.failures)) + "[/]"
    check = {"exact": "exact", "float rounding": "≈ exact"}.get(x.kernel_check, "[red]inexact[/]")
    name = escape(x.module) + (" [dim](lm_head)[/]" if x.role == "lm_head" else "")
    return [
        name,
        x.scheme,
        fmt.num(x.sqnr_db, ".1f"),
        fmt.num(x.cosine, ".5f"),
        fmt.num(x.max_rel_err, ".3f"),
        f"{fmt.num(x.channel_err, '.3f')} (#{x.worst_channel})",
        check,
        status,
    ]
