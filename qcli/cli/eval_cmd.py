"""`qcli eval OUT`: what a quantized checkpoint costs on real text (parse, call, render)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qcli.cli.app import app
from qcli.cli.options import IgnoreOpt, JsonOpt, QuietOpt, SchemeOpt, TokenOpt

_EXAMPLES = """

Examples:

  qcli eval ./Llama-3.2-1B-W8A8             (reference: the source in qcli_provenance.json)

  qcli eval ./out --reference ./Llama-3.2-1B --text my-domain.txt --ctx 1024

  qcli eval ./out --json | jq '.kld.mean, .quantized.ppl'

  qcli eval ./Llama-3.2-1B --sensitivity --scheme W8A8 --kl-budget 0.02

  qcli eval ./out --update-card             (adds the accuracy table to its README.md)

Exit codes: 0 within the scheme's thresholds; 1 a threshold missed; 2 unusable input.
"""


@app.command(
    "eval",
    help="Measure a quantized checkpoint against its dense reference on real text: perplexity,"
    " KL divergence of next-token distributions, top-1 agreement (one model in memory at a"
    " time)." + _EXAMPLES,
)
def eval_command(
    out: Annotated[
        Path, typer.Argument(help="The quantized checkpoint (with --sensitivity: a dense one).")
    ],
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            "-r",
            help="Dense reference (folder or hub repo id). Default: the local source recorded in"
            " qcli_provenance.json.",
        ),
    ] = None,
    text: Annotated[
        list[Path] | None,
        typer.Option("--text", help="UTF-8 text to score on (repeatable). Default: qcli's corpus."),
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per window, BOS included.")] = 512,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Score at most this many tokens.")
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="transformers, or vllm (its prompt log-probabilities).")
    ] = "transformers",
    vllm_python: Annotated[
        str | None,
        typer.Option(
            "--vllm-python",
            envvar="QCLI_VLLM_PYTHON",
            help="Python that has vLLM (--engine vllm). Default: this one.",
        ),
    ] = None,
    max_kld_mean: Annotated[
        float | None, typer.Option("--max-kld-mean", help="Override: KL mean bound (nats).")
    ] = None,
    max_kld_p99: Annotated[
        float | None, typer.Option("--max-kld-p99", help="Override: KL p99 bound (nats).")
    ] = None,
    max_ln_ppl_ratio: Annotated[
        float | None,
        typer.Option("--max-ln-ppl-ratio", help="Override: bound on ln(PPL_q / PPL_ref)."),
    ] = None,
    min_top1: Annotated[
        float | None, typer.Option("--min-top1", help="Override: top-1 agreement floor.")
    ] = None,
    sensitivity: Annotated[
        bool,
        typer.Option(
            "--sensitivity",
            help="OUT is dense: quantize one group of layers at a time (in memory) and rank"
            " the groups by the KL they cost.",
        ),
    ] = False,
    scheme: SchemeOpt = None,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="With --sensitivity: each layer a group too.")
    ] = False,
    kl_budget: Annotated[
        float | None,
        typer.Option("--kl-budget", help="With --sensitivity: the --ignore list meeting it."),
    ] = None,
    ignore: IgnoreOpt = None,
    update_card: Annotated[
        bool, typer.Option("--update-card", help="Add the accuracy table to OUT's model card.")
    ] = False,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Parse, call qcli.api, render (long only for the options its signature declares)."""
    import qcli
    from qcli.cli.output import Output
    from qcli.cli.views.evaluation import show_eval, show_sensitivity

    output = Output(as_json=as_json, quiet=quiet)
    with output.progress("eval", None, unit="windows") as bar:

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(done, total, stage)

        if sensitivity:
            found = qcli.sensitivity(
                out,
                scheme=scheme or "W8A8",
                texts=text or (),
                ctx=ctx,
                max_tokens=max_tokens,
                per_layer=per_layer,
                kl_budget=kl_budget,
                ignore=ignore or (),
                progress=progress,
            )
            output.json(found.to_json())
            show_sensitivity(output, found)
            return
        report = qcli.eval(
            out,
            reference=reference,
            texts=text or (),
            ctx=ctx,
            max_tokens=max_tokens,
            engine=engine,
            vllm_python=vllm_python,
            thresholds=dict(
                max_kld_mean=max_kld_mean,
                max_kld_p99=max_kld_p99,
                max_ln_ppl_ratio=max_ln_ppl_ratio,
                min_top1=min_top1,
            ),
            update_card=update_card,
            token=token,
            progress=progress,
        )
    output.json(report.to_json())
    show_eval(output, report)
    raise typer.Exit(report.exit_code)
