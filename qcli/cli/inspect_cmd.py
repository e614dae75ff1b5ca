"""`qcli inspect PATH|REPO`: what a checkpoint holds and what quantizing it would do.

Headers and config files only: milliseconds for a local checkpoint of any size, and no
weights downloaded for a hub repo. torch is never imported on this path.
"""

from __future__ import annotations

from typing import Annotated

import typer

from qcli.cli.app import app
from qcli.cli.options import (
    AllowUnmatchedOpt,
    DefaultIgnoreOpt,
    IgnoreOpt,
    JsonOpt,
    LmHeadOpt,
    QuietOpt,
    RevisionOpt,
    SchemeOpt,
    TargetsOpt,
    TokenOpt,
    plan_kwargs,
)

_EXAMPLES = """

Examples:

  qcli inspect ./Llama-3.2-1B

  qcli inspect meta-llama/Llama-3.2-1B --scheme W8A8 --lm-head

  qcli inspect ./model --filter 'layers\\.0\\.'   (one layer, every tensor)

  qcli inspect ./Llama-3.2-1B-W8A8               (a quantized checkpoint: scheme, contract)

  qcli inspect ./model --json | jq '.modules[] | select(.role == "lm_head")'
"""


@app.command(
    "inspect",
    help="Show a checkpoint (dense or quantized) and the quantize plan, from headers only."
    + _EXAMPLES,
)
def inspect_command(
    src: Annotated[str, typer.Argument(help="Local checkpoint folder or hub repo id (org/name).")],
    scheme: SchemeOpt = None,
    targets: TargetsOpt = None,
    ignore: IgnoreOpt = None,
    lm_head: LmHeadOpt = False,
    default_ignore: DefaultIgnoreOpt = None,
    allow_unmatched: AllowUnmatchedOpt = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Every tensor, one row each.")
    ] = False,
    pattern: Annotated[
        str | None,
        typer.Option("--filter", "-f", help="Only tensors whose name matches this regex."),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Parse, call qcli.api, render (long only for the options its signature declares)."""
    from rich.markup import escape

    import qcli
    from qcli.cli.output import Output
    from qcli.cli.views.common import compile_filter
    from qcli.cli.views.plan import show_plan
    from qcli.cli.views.summary import show_summary
    from qcli.errors import EXIT_BAD_INPUT

    output = Output(as_json=as_json, quiet=quiet)
    if pattern:
        compile_filter(pattern)  # a bad regex fails before anything is read
    options = plan_kwargs(scheme, targets, ignore, lm_head, default_ignore, allow_unmatched)
    found = qcli.inspect(src, revision=revision, token=token, **options)
    output.json(found.to_json())
    show_summary(output, found.summary, show_all, pattern)
    if found.plan is not None:
        show_plan(output, found.plan, table=True, show_all=show_all, pattern=pattern)
        if not found.explicit:
            output.result(
                "[dim]default plan (W8A8, targets Linear); --scheme, --targets, --ignore,"
                " --lm-head change it[/]"
            )
    elif found.plan_error:
        output.result(f"[bold]no quantize plan:[/] {escape(found.plan_error)}")
    # Options the checkpoint cannot take are an input error, as in `quantize --dry-run`.
    if found.plan_error and found.explicit:
        raise typer.Exit(EXIT_BAD_INPUT)
