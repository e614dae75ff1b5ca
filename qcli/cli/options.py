"""Options several commands take, declared once (as the `hf` CLI's _cli_utils.py does)."""

from __future__ import annotations

from typing import Annotated

import typer

RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="HF_TOKEN", help="Hub token.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="The result as JSON on stdout.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress, notes or warnings on stderr.")
]
SchemeOpt = Annotated[
    str | None,
    typer.Option("--scheme", "-s", help="W8A8 | W8A16 | FP8_DYNAMIC | FP8 (default W8A8)."),
]
TargetsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--targets",
        "-t",
        help="Module to quantize: exact name, class (Linear), or 're:' regex. Repeatable."
        " Default: Linear.",
    ),
]
IgnoreOpt = Annotated[
    list[str] | None,
    typer.Option("--ignore", "-i", help="Module to keep dense (same syntax; wins). Repeatable."),
]
LmHeadOpt = Annotated[
    bool,
    typer.Option("--lm-head", help="Quantize lm_head too (named in targets, as vLLM requires)."),
]
DefaultIgnoreOpt = Annotated[
    bool | None,
    typer.Option(
        "--default-ignore/--no-default-ignore",
        help="Keep lm_head, MoE routers, vision towers and classification heads dense unless"
        " named explicitly (default: on).",
        show_default=False,
    ),
]
AllowUnmatchedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unmatched",
        help="Warn, instead of failing, when a --targets/--ignore entry matches no module.",
    ),
]


def plan_kwargs(
    scheme: str | None,
    targets: list[str] | None,
    ignore: list[str] | None,
    lm_head: bool,
    default_ignore: bool | None,
    allow_unmatched: bool,
    int8_max: int | None = None,
) -> dict:
    """The plan options the user gave (qcli.api.plan_options), and only those: inspect shows
    the default plan when none is given."""
    given = {
        "scheme": scheme,
        "targets": targets or None,
        "ignore": ignore or None,
        "lm_head": lm_head or None,
        "default_ignore": default_ignore,
        "allow_unmatched": allow_unmatched or None,
        "int8_max": int8_max,
    }
    return {k: v for k, v in given.items() if v is not None}
