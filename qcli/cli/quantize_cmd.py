"""`qcli quantize SRC OUT`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from qcli.cli.app import RevisionOpt, TokenOpt, app

_EXAMPLES = """

Examples:

  qcli quantize ./Llama-3.2-1B ./Llama-3.2-1B-W8A8

  qcli quantize meta-llama/Llama-3.2-1B out/ --scheme FP8_DYNAMIC --lm-head

  qcli quantize ./model out/ --ignore 're:.*down_proj' --dry-run

  qcli quantize ./model out/ --json --quiet | jq .bytes_out
"""


@app.command(
    help="Quantize a checkpoint's Linear layers to int8 / fp8 compressed-tensors." + _EXAMPLES
)
def quantize(
    src: Annotated[str, typer.Argument(help="Local checkpoint folder or hub repo id (org/name).")],
    out: Annotated[str, typer.Argument(help="Output folder (must not exist unless --overwrite).")],
    scheme: Annotated[
        str, typer.Option("--scheme", "-s", help="W8A8 | W8A16 | FP8_DYNAMIC | FP8 (see README).")
    ] = "W8A8",
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--targets",
            "-t",
            help="Module to quantize: exact name, class (Linear), or 're:' regex. Repeatable."
            " Default: Linear.",
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore", "-i", help="Module to keep dense (same syntax; wins). Repeatable."
        ),
    ] = None,
    lm_head: Annotated[
        bool,
        typer.Option(
            "--lm-head", help="Quantize lm_head too (named in targets, as vLLM requires)."
        ),
    ] = False,
    default_ignore: Annotated[
        bool,
        typer.Option(
            "--default-ignore/--no-default-ignore",
            help="Keep lm_head, MoE routers and vision towers dense unless named explicitly.",
        ),
    ] = True,
    allow_unmatched: Annotated[
        bool,
        typer.Option(
            "--allow-unmatched",
            help="Warn, instead of failing, when a --targets/--ignore entry matches no module.",
        ),
    ] = False,
    int8_max: Annotated[
        int,
        typer.Option(
            "--int8-max",
            help="Largest int8 weight magnitude (1..127). 63 makes W8A8 exact on x86 CPUs"
            " without VNNI, whose int8 GEMM saturates on full-range weights.",
        ),
    ] = 127,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest output file.")
    ] = "5GB",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it exists.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan; write nothing.")
    ] = False,
    workers: Annotated[
        int, typer.Option("--workers", help="Threads (0: one per core, up to 4).")
    ] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable summary on stdout.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")
    ] = False,
) -> None:
    from qcli import plan as planning
    from qcli import report, source
    from qcli.errors import InputError
    from qcli.schemes import get_scheme
    from qcli.tensors import open_checkpoint

    opts = planning.Options(
        scheme=get_scheme(scheme),
        targets=tuple(targets or ("Linear",)),
        ignore=tuple(ignore or ()),
        lm_head=lm_head,
        default_ignore=default_ignore,
        allow_unmatched=allow_unmatched,
        int8_max=int8_max,
    )
    if not out.strip():
        # an unset $OUT in a script: "" would otherwise mean the working folder
        raise InputError("OUT is empty (an unset variable?); give the output folder")
    out_path = Path(out)
    shard_bytes = planning.parse_size(max_shard_size, "--max-shard-size")
    if workers < 0:
        raise InputError(f"--workers must be 0 (one per core) or more, not {workers}")
    if dry_run:
        # Headers only, before any download: a hub repo's weights are not fetched.
        from qcli.cli.inspect_cmd import dry_run as show_dry_run

        show_dry_run(src, out_path, opts, revision, token, shard_bytes, overwrite, as_json, quiet)
        return
    src_info = source.resolve(src, revision, token)
    plan = planning.build(open_checkpoint(src_info.folder), opts)

    from qcli.convert import check_output_path, convert

    check_output_path(plan, out_path, overwrite)
    provenance = {
        "source": src_info.provenance(),
        "options": {
            "scheme": opts.scheme.name,
            "targets": list(opts.targets),
            "ignore": list(opts.ignore),
            "lm_head": lm_head,
            "default_ignore": default_ignore,
            "allow_unmatched": allow_unmatched,
            "int8_max": int8_max,
            "max_shard_size": max_shard_size,
        },
    }
    if not quiet and not as_json:
        report.print_plan_summary(plan)
    t0 = time.perf_counter()
    with report.byte_progress(plan.bytes_in, enabled=not quiet) as advance:
        result = convert(
            plan,
            out_path,
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
