"""`qcli verify OUT [--reference SRC]`: prove a quantized checkpoint right before deploying it.

Parsing and rendering only: the checks live in qcli.checks (config against tensors) and
qcli.numerics (the quantized GEMM of every layer against the dense layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qcli.cli.app import app
from qcli.cli.options import QuietOpt, TokenOpt

_EXAMPLES = """

Examples:

  qcli verify ./Llama-3.2-1B-W8A8 --reference ./Llama-3.2-1B

  qcli verify ./out                  (reference: the source named in qcli_provenance.json)

  qcli verify ./out --no-reference   (dequantized weights: kernel and scales only)

  qcli verify ./big-model --fast --layers 'layers\\.(0|31)\\.|lm_head'

  qcli verify ./out --reference ./src --json | jq '.layers[] | select(.ok | not)'

  (what a checkpoint costs on real text, end to end: qcli eval)

Exit codes: 0 every check holds; 1 a check failed; 2 unusable input.
"""


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
            "--e2e", help="Gone: `qcli eval` measures the checkpoint on real text.", hidden=True
        ),
    ] = False,
    token: TokenOpt = None,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Show every layer.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Every layer's numbers and every finding on stdout.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Parse, call qcli.api, render (long only for the options its signature declares)."""
    import qcli
    from qcli.cli.output import Output
    from qcli.cli.views.verify import show_report
    from qcli.errors import InputError

    if reference and no_reference:
        raise InputError("--reference and --no-reference contradict each other")
    if e2e:
        raise InputError(
            "verify --e2e is gone: `qcli eval OUT` measures perplexity, KL and top-1 on real"
            " text, one model in memory at a time"
        )
    output = Output(as_json=as_json, quiet=quiet)
    with output.progress("verify", None, unit="layers") as bar:
        result = qcli.verify(
            out,
            reference=reference,
            use_provenance=not no_reference,
            layers=layers,
            fast=fast,
            tokens=_parse_tokens(tokens),
            seed=seed,
            token=token,
            progress=lambda done, total, name: bar.update(done, total, name),
        )
    output.json(result.to_json())
    show_report(output, result, show_all)
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
