"""`qcli quantize SRC OUT`: parse, call qcli.api.quantize (or dry_run), render."""

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

  qcli quantize ./Llama-3.2-1B ./Llama-3.2-1B-W8A8

  qcli quantize meta-llama/Llama-3.2-1B out/ --scheme FP8_DYNAMIC --lm-head

  qcli quantize ./model out/ --ignore 're:.*down_proj' --dry-run

  qcli quantize ./model out/ --json --quiet | jq .bytes_out

  qcli quantize org/big-model out/ --part 3/8      # one machine's share; then:

  qcli quantize org/big-model out/ --finish

  qcli quantize ./model out/ --ray                 # parts as Ray tasks (pip install 'qcli[ray]')
"""


@app.command(
    help="Quantize a checkpoint's Linear layers to int8 / fp8 compressed-tensors." + _EXAMPLES
)
def quantize(
    src: Annotated[str, typer.Argument(help="Local checkpoint folder or hub repo id (org/name).")],
    out: Annotated[str, typer.Argument(help="Output folder (must not exist unless --overwrite).")],
    scheme: SchemeOpt = None,
    targets: TargetsOpt = None,
    ignore: IgnoreOpt = None,
    lm_head: LmHeadOpt = False,
    default_ignore: DefaultIgnoreOpt = None,
    allow_unmatched: AllowUnmatchedOpt = False,
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
        bool,
        typer.Option(
            "--overwrite", help="Replace OUT if it holds only a checkpoint (or qcli's output)."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan; write nothing.")
    ] = False,
    workers: Annotated[
        int, typer.Option("--workers", help="Threads (0: one per core, up to 4).")
    ] = 0,
    part: Annotated[
        str | None,
        typer.Option(
            "--part",
            metavar="I/N",
            help="Write only part I of N of the output shards (every machine plans alike);"
            " then run --finish once.",
        ),
    ] = None,
    finish: Annotated[
        bool,
        typer.Option(
            "--finish", help="After every --part: check the shards, write the rest of OUT."
        ),
    ] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run the parts as Ray tasks (RAY_ADDRESS or --ray-address; else a local"
            " cluster), then finish.",
        ),
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="The Ray cluster for --ray.")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="A line per tensor, with its size before and after."),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Parse, call qcli.api, render (long only for the options its signature declares)."""
    import qcli
    from qcli.cli.output import Output
    from qcli.errors import InputError

    output = Output(as_json=as_json, quiet=quiet)
    options = plan_kwargs(
        scheme, targets, ignore, lm_head, default_ignore, allow_unmatched, int8_max
    )
    if workers < 0:
        raise InputError(f"--workers must be 0 (one per core) or more, not {workers}")
    common = dict(revision=revision, token=token, max_shard_size=max_shard_size, **options)
    modes = [m for m, on in (("--part", part), ("--finish", finish), ("--ray", ray)) if on]
    if ray_address and not ray:
        raise InputError("--ray-address goes with --ray")
    if len(modes) > 1 or (modes and (dry_run or overwrite)):
        extra = modes + (["--dry-run"] if dry_run else []) + (["--overwrite"] if overwrite else [])
        raise InputError(f"{' and '.join(extra)} do not go together")
    if modes:
        _split_run(output, src, out, part, finish, ray_address, workers, verbose, common)
        return
    if dry_run:
        _dry_run(output, qcli.dry_run(src, out, overwrite=overwrite, **common), max_shard_size)
        return

    def on_plan(plan) -> None:
        from qcli.cli.views.plan import plan_lines

        for line in plan_lines(plan):
            output.info(line)
        for w in plan.warnings:
            output.warn(w)
        _shard_note(output, plan, max_shard_size)

    with output.progress("quantize", None) as bar:

        def planned(plan) -> None:
            bar.update(0, plan.bytes_in)  # the plan knows the total once it is made
            on_plan(plan)

        def on_tensor(tp) -> None:
            if verbose:
                output.info(_tensor_line(tp))

        done = qcli.quantize(
            src,
            out,
            overwrite=overwrite,
            workers=workers or None,
            progress=bar.advance,
            on_tensor=on_tensor,
            on_plan=planned,
            **common,
        )
    output.json(done.to_json())
    _written(output, done)


def _split_run(output, src, out, part, finish, ray_address, workers, verbose, common) -> None:
    """--part, --finish or --ray (qcli.parts, qcli.cluster)."""
    import qcli

    def on_plan(plan) -> None:
        for w in plan.warnings:
            output.warn(w)

    if finish:
        done = qcli.finish_parts(src, out, **common)
        output.json(done.to_json())
        _written(output, done)
        return
    with output.progress("quantize", None) as bar:

        def planned(plan) -> None:
            bar.update(0, plan.bytes_in)
            on_plan(plan)

        if part is not None:
            got = qcli.quantize_part(
                src,
                out,
                part,
                workers=workers or None,
                progress=bar.advance,
                on_tensor=(lambda tp: output.info(_tensor_line(tp))) if verbose else None,
                on_plan=planned,
                **common,
            )
        else:
            done = qcli.quantize_on_ray(
                src,
                out,
                address=ray_address,
                cpus=workers or 1,
                progress=bar.advance,
                on_plan=planned,
                **common,
            )
    if part is not None:
        output.json(got.to_json())
        kept = f", {len(got.kept)} kept from an earlier run" if got.kept else ""
        output.result(
            f"[green]part {got.split}[/]: {len(got.written)} shard(s) written{kept} in"
            f" {got.seconds:.1f} s; run --finish once every part is done"
        )
        return
    output.json(done.to_json())
    _written(output, done)


def _tensor_line(tp) -> str:
    from rich.markup import escape

    from qcli.cli import fmt

    what = tp.action if tp.quantizer is None else f"quantize {tp.quantizer.qtype}"
    return (
        f"{escape(tp.source)}: {what}, {tp.info.dtype}{list(tp.info.shape)}"
        f" {fmt.size(tp.bytes_in)} → {fmt.size(tp.bytes_out)}"
    )


def _shard_note(output, plan, max_shard_size: str) -> None:
    from qcli import sharding
    from qcli.cli import fmt

    big = sharding.oversized(plan, sharding.parse_size(max_shard_size, "--max-shard-size"))
    if big is not None:
        output.warn(
            f"--max-shard-size {max_shard_size} is smaller than the largest tensor"
            f" ({big.source}, {fmt.size(big.bytes_out)} written): a tensor that does not fit"
            " gets a shard of its own, larger than the limit"
        )


def _written(output, done) -> None:
    from rich.markup import escape

    from qcli.cli import fmt

    w = done.written
    output.result(
        f"[green]wrote[/] {escape(str(w.out))}: {fmt.plural(len(w.files), 'file')},"
        f" {fmt.size(w.bytes_out)} in {w.seconds:.1f} s ({fmt.rate(w.bytes_in, w.seconds)})",
        f"lm_head: {escape(done.plan.head.summary())}",
    )


def _dry_run(output, dry, max_shard_size: str) -> None:
    from rich.markup import escape

    from qcli.cli.views.plan import show_plan

    output.json(dry.to_json())
    output.result(f"[bold]{escape(dry.label)}[/] → {escape(str(dry.out))}")
    show_plan(output, dry.plan, table=True)
    _shard_note(output, dry.plan, max_shard_size)
    for n in dry.problems:
        output.warn(n)
    output.result(
        f"[dim]dry run: nothing written (would write {len(dry.files)} weight file"
        f"{'s' if len(dry.files) != 1 else ''} to {escape(str(dry.out))})[/]"
    )
