"""`qcli quantize SRC OUT`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from qcli.cli.app import app

_EXAMPLES = """

Examples:

  qcli quantize ./Llama-3.2-1B ./Llama-3.2-1B-W8A8

  qcli quantize meta-llama/Llama-3.2-1B out/ --scheme FP8_DYNAMIC --lm-head

  qcli quantize ./model out/ --ignore 're:.*down_proj' --dry-run

  qcli quantize ./model out/ --json --quiet | jq .bytes_out
"""


@app.command(help="Quantize a checkpoint's Linear layers to int8 / fp8 compressed-tensors." + _EXAMPLES)
def quantize(
    src: str = typer.Argument(..., help="Local checkpoint folder or hub repo id (org/name)."),
    out: Path = typer.Argument(..., help="Output folder (must not exist unless --overwrite)."),
    scheme: str = typer.Option(
        "W8A8", "--scheme", "-s", help="W8A8 | W8A16 | FP8_DYNAMIC | FP8 (see README)."
    ),
    targets: list[str] = typer.Option(
        None,
        "--targets",
        "-t",
        help="Module to quantize: exact name, class (Linear), or 're:' regex. Repeatable."
        " Default: Linear.",
    ),
    ignore: list[str] = typer.Option(
        None, "--ignore", "-i", help="Module to keep dense (same syntax; wins). Repeatable."
    ),
    lm_head: bool = typer.Option(
        False, "--lm-head", help="Quantize lm_head too (named in targets, as vLLM requires)."
    ),
    default_ignore: bool = typer.Option(
        True,
        "--default-ignore/--no-default-ignore",
        help="Keep lm_head, MoE routers and vision towers dense unless named explicitly.",
    ),
    revision: str = typer.Option(None, "--revision", help="Hub revision (branch, tag, commit)."),
    token: str = typer.Option(None, "--token", envvar="HF_TOKEN", help="Hub token.", show_default=False),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; write nothing."),
    workers: int = typer.Option(0, "--workers", help="Threads (0: one per core, up to 4)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
) -> None:
    from qcli import plan as planning
    from qcli import report, source
    from qcli.schemes import get_scheme
    from qcli.tensors import open_checkpoint

    opts = planning.Options(
        scheme=get_scheme(scheme),
        targets=tuple(targets or ("Linear",)),
        ignore=tuple(ignore or ()),
        lm_head=lm_head,
        default_ignore=default_ignore,
    )
    shard_bytes = planning.parse_size(max_shard_size)
    src_info = source.resolve(src, revision, token)
    plan = planning.build(open_checkpoint(src_info.folder), opts)

    if dry_run:
        if as_json:
            body = report.plan_json(plan)
            body["dry_run"] = True
            body["files"] = [name for name, _ in planning.shard_layout(plan, shard_bytes)]
            report.emit_json(body)
        if not quiet:
            if not as_json:
                report.console.print(report.plan_table(plan))
            report.print_plan_summary(plan)
            report.console.print("[dim]dry run: nothing written[/]")
        return

    from qcli.convert import check_output_path, convert

    check_output_path(plan, out, overwrite)
    provenance = {
        "source": src_info.provenance(),
        "options": {
            "scheme": opts.scheme.name,
            "targets": list(opts.targets),
            "ignore": list(opts.ignore),
            "lm_head": lm_head,
            "default_ignore": default_ignore,
            "max_shard_size": max_shard_size,
        },
    }
    if not quiet and not as_json:
        report.print_plan_summary(plan)
    t0 = time.perf_counter()
    with report.byte_progress(plan.bytes_in, enabled=not quiet) as advance:
        result = convert(
            plan,
            out,
            overwrite=overwrite,
            max_shard_size=shard_bytes,
            provenance=provenance,
            progress=advance,
            workers=workers or None,
        )
    seconds = time.perf_counter() - t0
    if as_json:
        body = report.plan_json(plan, detail=False)
        body.update(out=str(result.out), files=result.files, seconds=round(seconds, 3))
        report.emit_json(body)
    if not quiet:
        report.console.print(
            f"[green]wrote[/] {result.out} ({len(result.files)} files,"
            f" {report.human_bytes(result.bytes_out)}) in {seconds:.1f} s"
            f" ({report.human_bytes(result.bytes_in / max(seconds, 1e-9))}/s)"
        )
