"""`qcli verify OUT [--reference SRC]`: prove a quantized checkpoint right before deploying it.

Parsing and rendering only: the checks live in qcli.contract (config against tensors) and
qcli.verify (the quantized GEMM of every layer against the dense layer).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qcli.cli.app import TokenOpt, app

if TYPE_CHECKING:
    from qcli.verify import LayerResult, Report

_EXAMPLES = """

Examples:

  qcli verify ./Llama-3.2-1B-W8A8 --reference ./Llama-3.2-1B

  qcli verify ./out                  (reference: the source named in qcli_provenance.json)

  qcli verify ./out --no-reference   (dequantized weights: kernel and scales only)

  qcli verify ./big-model --fast --layers 'layers\\.(0|31)\\.|lm_head'

  qcli verify ./out --reference ./src --e2e --json | jq '.layers[] | select(.ok | not)'

Exit codes: 0 every check holds; 1 a check failed; 2 unusable input.
"""

TABLE_ROWS = 20  # layers shown by default: the worst ones, plus lm_head


@app.command(
    "verify",
    help="Check a quantized checkpoint against the compressed-tensors contract and run every"
    " quantized layer's GEMM against the dense layer." + _EXAMPLES,
)
def verify_command(
    out: Annotated[Path, typer.Argument(help="The quantized checkpoint folder.")],
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            "-r",
            help="Dense source checkpoint (folder or hub repo id) to compare every layer with."
            " Default: the local source recorded in qcli_provenance.json.",
        ),
    ] = None,
    no_reference: Annotated[
        bool,
        typer.Option(
            "--no-reference",
            help="Compare with the dequantized weights, even if a source is known.",
        ),
    ] = False,
    layers: Annotated[
        str | None,
        typer.Option("--layers", "-l", help="Only layers whose name matches this regex."),
    ] = None,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help="One batch of 32 tokens and 256 sampled rows per layer (can miss one bad row).",
        ),
    ] = False,
    tokens: Annotated[
        str,
        typer.Option("--tokens", help="Token counts of the activation batches, comma-separated."),
    ] = "1,7,64",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the activation batches.")] = 0,
    e2e: Annotated[
        bool,
        typer.Option(
            "--e2e", help="Also run both models in transformers: logits KL and top-1 agreement."
        ),
    ] = False,
    token: TokenOpt = None,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Show every layer.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Every layer's numbers and every finding on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr.")] = False,
) -> None:
    from qcli import report as out_report
    from qcli import verify
    from qcli.errors import InputError

    if reference and no_reference:
        raise InputError("--reference and --no-reference contradict each other")
    opts = verify.Options(tokens=_parse_tokens(tokens), fast=fast, seed=seed)
    with _progress(enabled=not quiet and not as_json) as advance:
        result = verify.verify_checkpoint(
            out,
            reference=reference,
            use_provenance=not no_reference,
            layers=layers,
            options=opts,
            run_e2e=e2e,
            token=token,
            progress=advance,
        )
    if as_json:
        out_report.emit_json(result.to_json())
    if not quiet:
        _render(result, show_all)
    raise typer.Exit(result.exit_code)


def _parse_tokens(text: str) -> tuple[int, ...]:
    from qcli.errors import InputError

    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InputError(f"--tokens: expected comma-separated counts, got {text!r}") from None
    if not values or any(v < 1 or v > 4096 for v in values):
        raise InputError(f"--tokens: counts must be in 1..4096, got {text!r}")
    return values


class _progress:  # noqa: N801  (a context manager that reads like a function)
    """A layer counter on a terminal; a no-op otherwise."""

    def __init__(self, enabled: bool):
        from qcli.report import console

        self.enabled = enabled and console.is_terminal
        self._p = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from qcli.report import console

        self._p = Progress(
            TextColumn("[bold]verify"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[dim]{task.fields[layer]}"),
            console=console,
            transient=True,
        )
        self._p.__enter__()
        task = self._p.add_task("verify", total=None, layer="")

        def advance(done: int, total: int, layer: str) -> None:
            self._p.update(task, completed=done, total=total, layer=layer)

        return advance

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False


# --- rendering ---------------------------------------------------------------------------------


def _fmt(v: float, spec: str) -> str:
    return format(v, spec) if math.isfinite(v) else str(v)


def _render(r: Report, show_all: bool) -> None:
    from rich.markup import escape

    from qcli.report import console, findings_table

    if r.reference is not None:
        console.print(
            f"reference: {escape(str(r.reference.folder))} ({r.reference.origin})", soft_wrap=True
        )
    elif r.reference_note:
        console.print(f"[dim]reference: {escape(r.reference_note)}[/]", soft_wrap=True)

    table = findings_table(r.contract)
    if table is not None:
        console.print(table)
    else:
        console.print("contract: [green]ok[/]")

    if r.layers:
        console.print(_layer_table(r, show_all))
        for scheme, k in r.kernels().items():
            dev = _fmt(k["max_dev"], ".1e")
            verdict = {
                "exact": "bit-exact against exact integer math",
                "float rounding": f"within float32 rounding of exact math ({dev} of the range)",
            }.get(
                k["check"],
                f"[red]INEXACT[/]: off by {dev} of the output's range on this CPU — the kernel's"
                " fault, not the checkpoint's; the verdict uses exact math",
            )
            console.print(
                f"{scheme}: {escape(', '.join(k['kernels']))} — {verdict}", soft_wrap=True
            )
        notes = sorted({n for layer in r.layers for n in layer.notes if "tied" not in n})
        for n in notes[:5]:
            console.print(f"[dim]note: {escape(n)}[/]", soft_wrap=True)
    if r.cpu.get("int8_may_saturate"):
        console.print(
            "[yellow]this CPU has no VNNI/AMX: x86 int8 GEMMs (vLLM's oneDNN path) saturate"
            " here for full-range int8 weights; verify computed exact integer math instead, so"
            " the numbers above judge the checkpoint, not this CPU's kernel[/]",
            soft_wrap=True,
        )
    if r.e2e is not None:
        e = r.e2e
        mark = "[green]ok[/]" if e["ok"] else "[red]" + escape("; ".join(e["failures"])) + "[/]"
        conf = e["confident_top1_agreement"]
        judged = (
            f"{conf:.1%} on {e['confident_positions']} confident positions"
            if conf is not None
            else "not judged: the reference is confident nowhere (random weights?)"
        )
        console.print(
            f"end to end ({e['loader']}, {e['positions']} positions): logits KL"
            f" {float(e['kl']):.3g} nats, top-1 agreement {e['top1_agreement']:.1%} ({judged})"
            f" {mark}",
            soft_wrap=True,
        )
    failed = [layer for layer in r.layers if not layer.ok]
    if r.ok:
        console.print(
            f"[green]verify: ok[/] — contract holds, {len(r.layers)} layer(s) within their"
            " thresholds"
        )
    else:
        parts = []
        if r.contract.errors:
            parts.append(f"{len(r.contract.errors)} contract error(s)")
        if failed:
            parts.append(f"{len(failed)} layer(s) out of bounds")
        if r.e2e is not None and not r.e2e["ok"]:
            parts.append("end-to-end check")
        console.print(f"[bold red]verify: FAILED[/] — {', '.join(parts)}")


def _layer_table(r: Report, show_all: bool):
    from rich.markup import escape
    from rich.table import Table

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
        row = _layer_row(x, escape)
        table.add_row(*(row if schemes else row[:1] + row[2:]))
    hidden = len(r.layers) - len(shown)
    if hidden:
        table.add_row(f"[dim]… {hidden} more (--all)[/]")
    return table


def _layer_row(x: LayerResult, escape) -> list[str]:
    status = "[green]ok[/]" if x.ok else "[red]" + escape("; ".join(x.failures)) + "[/]"
    check = {"exact": "exact", "float rounding": "≈ exact"}.get(x.kernel_check, "[red]inexact[/]")
    name = escape(x.module) + (" [dim](lm_head)[/]" if x.role == "lm_head" else "")
    return [
        name,
        x.scheme,
        _fmt(x.sqnr_db, ".1f"),
        _fmt(x.cosine, ".5f"),
        _fmt(x.max_rel_err, ".3f"),
        f"{_fmt(x.channel_err, '.3f')} (#{x.worst_channel})",
        check,
        status,
    ]
