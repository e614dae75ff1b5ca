"""`qcli eval` for people: the two models side by side, the divergence, the verdict."""

from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

from qcli.cli import fmt
from qcli.cli.output import Output


def show_eval(out: Output, r) -> None:
    c = r.comparison
    out.result(
        f"text: {escape(r.text)}; {c.tokens} tokens scored in {len(r.windows.windows)} windows"
        f" ({escape(r.windows.to_json()['rule'])})",
        f"reference: {escape(str(r.reference))} ({r.reference_origin})",
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for col in ("", "PPL", "± stderr", "loader", "dtype", "kernels"):
        table.add_column(col)
    for label, ppl, eng in (
        ("reference", c.reference, r.engines["reference"] or {}),
        (f"quantized ({r.scheme})", c.quantized, r.engines["quantized"] or {}),
    ):
        table.add_row(
            label,
            fmt.num(ppl.ppl, ".3f"),
            fmt.num(ppl.stderr, ".3f"),
            escape(str(eng.get("loader", "?"))),
            escape(str(eng.get("dtype", "?"))),
            escape(str(eng.get("kernels", "?"))),
        )
    out.result(table)
    k = c.kld
    out.result(
        f"ln(PPL_q/PPL_ref) = {fmt.num(c.ln_ppl_ratio, '+.4f')}"
        f" ± {fmt.num(c.ln_ppl_ratio_stderr, '.4f')}",
        f"KL divergence (nats/token): mean {fmt.num(k.mean, '.4f')} ± {fmt.num(k.stderr, '.4f')},"
        f" median {fmt.num(k.median, '.4f')}, p90 {fmt.num(k.p90, '.4f')},"
        f" p99 {fmt.num(k.p99, '.4f')}, max {fmt.num(k.max, '.3f')}",
        f"top-1 agreement: {c.top1_agreement:.2%}",
    )
    reused = "reused" if r.cache["reused"] else "written"
    out.info(
        f"[dim]reference log-probabilities {reused}: {escape(r.cache['path'])}"
        f" ({fmt.size(r.cache['bytes'])})[/]"
    )
    if r.ok:
        out.result(f"[green]eval: ok[/] — within the {r.scheme} thresholds")
    else:
        out.result(f"[bold red]eval: FAILED[/] — {escape('; '.join(r.failures))}")


def show_sensitivity(out: Output, s) -> None:
    table = Table(
        title=f"Sensitivity: {s.scheme}, one group quantized at a time, ranked by KL",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("#", "group", "modules", "KL mean", "KL p99", "ΔPPL %", "top-1"):
        table.add_column(col, justify="right" if col != "group" else "left")
    for i, g in enumerate(s.ranked, 1):
        table.add_row(
            str(i),
            escape(g.name),
            str(len(g.modules)),
            fmt.num(g.comparison.kld.mean, ".5f"),
            fmt.num(g.comparison.kld.p99, ".4f"),
            fmt.num(g.ppl_change * 100, "+.2f"),
            f"{g.comparison.top1_agreement:.1%}",
        )
    out.result(table)
    out.result(
        f"reference PPL {fmt.num(s.reference_ppl, '.3f')} on {s.tokens} tokens; all groups at"
        f" once (sum of the groups' KL, an estimate): {fmt.num(s.total_estimate, '.4f')}"
    )
    if s.budget is not None:
        flags = " ".join(f"--ignore '{escape(e)}'" for e in s.ignore) or "(none needed)"
        out.result(
            f"to stay within KL {s.budget:g} (estimated {fmt.num(s.budget_estimate, '.4f')}):"
            f" {flags}"
        )
