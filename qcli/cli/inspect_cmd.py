"""`qcli inspect PATH|REPO`: what a checkpoint holds and what quantizing it would do.

Headers and config files only: milliseconds for a local checkpoint of any size, and no
weights downloaded for a hub repo. torch is never imported on this path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qcli.cli.app import RevisionOpt, TokenOpt, app

if TYPE_CHECKING:
    from qcli.inspect import Summary
    from qcli.plan import Options

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
    scheme: Annotated[
        str | None,
        typer.Option("--scheme", "-s", help="Plan with this scheme (default plan: W8A8)."),
    ] = None,
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--targets", "-t", help="As in quantize: name, class or 're:' regex. Repeatable."
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option("--ignore", "-i", help="As in quantize: modules to keep dense. Repeatable."),
    ] = None,
    lm_head: Annotated[bool, typer.Option("--lm-head", help="Plan lm_head quantized too.")] = False,
    default_ignore: Annotated[
        bool | None,
        typer.Option(
            "--default-ignore/--no-default-ignore",
            help="As in quantize (default: on).",
            show_default=False,
        ),
    ] = None,
    allow_unmatched: Annotated[
        bool,
        typer.Option(
            "--allow-unmatched", help="As in quantize: warn when an entry matches no module."
        ),
    ] = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Every tensor, one row each.")
    ] = False,
    pattern: Annotated[
        str | None,
        typer.Option("--filter", "-f", help="Only tensors whose name matches this regex."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Everything as JSON on stdout.")] = False,
) -> None:
    from rich.markup import escape

    from qcli import inspect as inspecting
    from qcli import plan as planning
    from qcli import report, rules
    from qcli.errors import EXIT_BAD_INPUT, QcliError
    from qcli.schemes import get_scheme

    explicit = bool(
        scheme or targets or ignore or lm_head or allow_unmatched or default_ignore is not None
    )
    opts = planning.Options(
        scheme=get_scheme(scheme or "W8A8"),
        targets=tuple(targets or rules.DEFAULT_TARGETS),
        ignore=tuple(ignore or ()),
        lm_head=lm_head,
        default_ignore=True if default_ignore is None else default_ignore,
        allow_unmatched=allow_unmatched,
    )
    if pattern:
        report.compile_filter(pattern)  # a bad regex fails before anything is read
    opened = inspecting.open_source(src, revision, token)
    summary = inspecting.summarize(opened)

    plan, plan_error = None, None
    if not summary.quantized or explicit:
        try:
            plan = planning.build(opened.checkpoint, opts)
        except QcliError as e:
            plan_error = str(e)

    if as_json:
        body = inspecting.summary_json(summary)
        body["plan"] = report.plan_json(plan) if plan else None
        body["plan_error"] = plan_error
        report.emit_json(body)
    else:
        render(summary, show_all, pattern)
        if plan is not None:
            report.console.print(report.plan_table(plan, show_all, pattern))
            report.print_plan_summary(plan)
            if not explicit:
                report.console.print(
                    "[dim]default plan (W8A8, targets Linear); --scheme, --targets, --ignore,"
                    " --lm-head change it[/]"
                )
        elif plan_error:
            report.console.print(f"[bold]no quantize plan:[/] {escape(plan_error)}", soft_wrap=True)
    # Options the checkpoint cannot take are an input error, as in `quantize --dry-run`.
    if plan_error and explicit:
        raise typer.Exit(EXIT_BAD_INPUT)


def dry_run(
    src: str,
    out: Path,
    opts: Options,
    revision: str | None,
    token: str | None,
    shard_bytes: int,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """`quantize --dry-run`: the plan quantize would execute, from headers; writes nothing."""
    from rich.markup import escape

    from qcli import inspect as inspecting
    from qcli import plan as planning
    from qcli import report
    from qcli.convert import check_output_path
    from qcli.errors import QcliError

    opened = inspecting.open_source(src, revision, token)
    plan = planning.build(opened.checkpoint, opts)
    files = [name for name, _ in planning.shard_layout(plan, shard_bytes)]
    notes = []
    try:
        check_output_path(plan, out, overwrite)
    except QcliError as e:  # the real run would stop here: say so, but the preview stands
        notes.append(f"quantize would stop: {e}")
    if as_json:
        body = report.plan_json(plan)
        body.update(
            source=opened.source, out=str(out), files=files, dry_run=True, output_problems=notes
        )
        report.emit_json(body)
    if quiet:
        return
    if not as_json:
        report.console.print(f"[bold]{escape(opened.label)}[/] → {escape(str(out))}")
        report.console.print(report.plan_table(plan))
    report.print_plan_summary(plan)
    for n in notes:
        report.warn(escape(n))
    report.console.print(
        f"[dim]dry run: nothing written (would write {len(files)} weight file"
        f"{'s' if len(files) != 1 else ''} to {escape(str(out))})[/]"
    )


def render(s: Summary, show_all: bool = False, pattern: str | None = None) -> None:
    """The summary for people: overview, tensors (collapsed by layer), quantization."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from qcli import inspect as inspecting
    from qcli.report import compile_filter, console, human_bytes, short_bytes, warn

    ck = s.checkpoint
    params = s.parameters()
    overview = Table.grid(padding=(0, 2))
    overview.add_column(style="bold")
    overview.add_column()
    overview.add_row("checkpoint", escape(s.label))
    overview.add_row("architecture", escape(", ".join(s.architectures)) or "?")
    if s.model_type:
        overview.add_row("model type", s.model_type)
    overview.add_row(
        "parameters",
        f"{_count(sum(params.values()))}  ("
        + ", ".join(f"{k} {_count(v)}" for k, v in params.items())
        + ")",
    )
    files = s.files()
    overview.add_row(
        "size",
        f"{human_bytes(s.bytes)} in {len(files)} file{'s' if len(files) != 1 else ''}"
        + (" (sharded, with index)" if ck.sharded else ""),
    )
    if len(files) > 1:
        overview.add_row(
            "shards",
            ", ".join(f"{f['name']} {human_bytes(f['bytes'])}" for f in files[:4])
            + (f", … {len(files) - 4} more" if len(files) > 4 else ""),
        )
    overview.add_row(
        "modules", ", ".join(f"{n} {k}" for k, n in sorted(s.kind_counts().items())) or "?"
    )
    overview.add_row("tied embeddings", "yes" if s.tied_embeddings else "no")
    src = s.source
    if src.get("repo_id"):
        got = len(src.get("headers_fetched") or [])
        overview.add_row(
            "hub",
            f"commit {src['revision']}; {got} header(s) fetched by range request,"
            f" {len(src.get('headers_cached') or [])} from the cache; no weights downloaded",
        )
    console.print(overview)
    if s.kinds_error:
        warn(escape(f"module kinds unknown: {s.kinds_error}"))
    for w in s.warnings:
        warn(escape(w))

    table = Table(title="Tensors", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("tensor", overflow="fold", ratio=1)
    table.add_column("kind", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    rows = s.tensors
    if pattern:
        rx = compile_filter(pattern)
        rows = [t for t in rows if rx.search(t.name)]
    by_name = {t.name: t for t in rows}
    if show_all or pattern:
        groups = [([t.name], t.name) for t in rows]
    else:
        groups = [(c.names, c.label) for c in inspecting.collapse(list(by_name))]
    for names, label in groups:
        members = [by_name[n] for n in names]
        t = members[0]
        same = all(m.shape == t.shape and m.dtype == t.dtype for m in members)
        table.add_row(
            escape(label),
            inspecting.kind_label(t),
            t.dtype if same else "mixed",
            str(list(t.shape)) if same else "mixed",
            short_bytes(sum(m.nbytes for m in members)),
        )
    if not rows:
        table.add_row(f"[dim]no tensor matches {escape(repr(pattern))}[/]", "", "", "", "")
    console.print(table)
    if s.quantization is not None:
        _render_quantization(s)


def _render_quantization(s: Summary) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from qcli.report import console, human_bytes

    q = s.quantization
    table = Table(title="Quantization", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("group", "scheme", "format", "targets", "modules"):
        table.add_column(col)
    for g in q.groups:
        targets = escape(", ".join(g.targets))
        table.add_row(g.name, g.scheme, g.format or "?", targets, str(len(g.modules)))
    console.print(table)
    ignored = ", ".join(q.ignore[:4]) + (" …" if len(q.ignore) > 4 else "")
    console.print(
        f"{q.method or 'no quant_method'}, status {q.status or '?'}: {len(q.quantized)}"
        f" modules quantized, {len(q.dense_linear)} Linear kept dense"
        + (f" (ignore: {escape(ignored)})" if q.ignore else "")
    )
    lm = f"lm_head: [bold]{q.lm_head}[/]"
    if q.contract is not None and q.contract.lm_head is not None:
        h = q.contract.lm_head
        lm += (
            f" (vLLM runs it {'quantized' if h.vllm else 'dense'},"
            f" transformers {'quantized' if h.transformers else 'dense'})"
        )
    console.print(lm)
    console.print(
        f"compression: {human_bytes(s.bytes)} stored vs ~{human_bytes(q.dense_bytes)}"
        f" {q.dense_dtype or 'dense'} ({q.ratio(s.bytes):.2f}×)"
    )
    if q.unmatched:
        console.print(
            f"[yellow]{len(q.unmatched)} quantized module(s) that no group targets:[/]"
            f" {escape(', '.join(q.unmatched[:4]))}"
        )
    if q.contract is None:
        console.print(f"[dim]contract checks {escape(q.contract_error or '')}[/]", soft_wrap=True)
        return
    from qcli.report import findings_table

    table = findings_table(q.contract)
    if table is None:
        console.print("contract: [green]ok[/] (every verify check that needs no numbers passed)")
        return
    console.print(table)


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
