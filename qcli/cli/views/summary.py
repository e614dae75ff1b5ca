"""A checkpoint for people: overview, tensors (collapsed by layer), quantization."""

from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

from qcli.cli import fmt
from qcli.cli.output import Output
from qcli.cli.views.common import collapse, compile_filter, findings_table
from qcli.summary import Summary, kind_label


def show_summary(out: Output, s: Summary, show_all: bool = False, pattern: str | None = None):
    out.result(_overview(s))
    if s.kinds_error:
        out.warn(f"module kinds unknown: {s.kinds_error}")
    for w in s.warnings:
        out.warn(w)
    out.result(_tensors(s, show_all, pattern))
    if s.quantization is not None:
        _quantization(out, s)


def _overview(s: Summary) -> Table:
    params = s.parameters()
    overview = Table.grid(padding=(0, 2))
    overview.add_column(style="bold")
    overview.add_column()
    overview.add_row("checkpoint", escape(s.label))
    overview.add_row("architecture", escape(", ".join(s.architectures)) or "?")
    if s.model_type:
        overview.add_row("model type", escape(str(s.model_type)))
    overview.add_row(
        "parameters",
        f"{fmt.count(sum(params.values()))}  ("
        + ", ".join(f"{k} {fmt.count(v)}" for k, v in params.items())
        + ")",
    )
    files = s.files()
    overview.add_row(
        "size",
        f"{fmt.size(s.bytes)} in {fmt.plural(len(files), 'file')}"
        + (" (sharded, with index)" if s.checkpoint.sharded else ""),
    )
    if len(files) > 1:
        overview.add_row(
            "shards",
            ", ".join(f"{escape(f['name'])} {fmt.size(f['bytes'])}" for f in files[:4])
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
    return overview


def _tensors(s: Summary, show_all: bool, pattern: str | None) -> Table:
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
        groups = [(c.names, c.label) for c in collapse(list(by_name))]
    for names, label in groups:
        members = [by_name[n] for n in names]
        t = members[0]
        same = all(m.shape == t.shape and m.dtype == t.dtype for m in members)
        table.add_row(
            escape(label),
            kind_label(t),
            t.dtype if same else "mixed",
            str(list(t.shape)) if same else "mixed",
            fmt.size(sum(m.nbytes for m in members)),
        )
    if not rows:
        table.add_row(f"[dim]no tensor matches {escape(repr(pattern))}[/]", "", "", "", "")
    return table


def _quantization(out: Output, s: Summary) -> None:
    q = s.quantization
    assert q is not None
    table = Table(title="Quantization", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("group", "scheme", "format", "targets", "modules"):
        table.add_column(col)
    for g in q.groups:
        targets = escape(", ".join(g.targets))
        table.add_row(
            escape(g.name), g.scheme, escape(g.format or "?"), targets, str(len(g.modules))
        )
    if q.groups:
        out.result(table)
    ignored = ", ".join(q.ignore[:4]) + (" …" if len(q.ignore) > 4 else "")
    if q.stored_as is not None:
        lines = [
            f"{escape(q.method or '?')} release, {escape(q.stored_as)}: {len(q.quantized)}"
            f" modules stored quantized, {len(q.dense_linear)} Linear dense; quantize decodes"
            " and re-quantizes them"
        ]
    else:
        lines = [
            f"{escape(q.method or 'no quant_method')}, status {escape(q.status or '?')}:"
            f" {len(q.quantized)} modules quantized, {len(q.dense_linear)} Linear kept dense"
            + (f" (ignore: {escape(ignored)})" if q.ignore else "")
        ]
    lm = f"lm_head: [bold]{q.lm_head}[/]"
    if q.contract is not None and q.contract.lm_head is not None:
        h = q.contract.lm_head
        lm += (
            f" (vLLM runs it {'quantized' if h.vllm else 'dense'},"
            f" transformers {'quantized' if h.transformers else 'dense'})"
        )
    lines.append(lm)
    lines.append(
        f"compression: {fmt.size(s.bytes)} stored vs ~{fmt.size(q.dense_bytes)}"
        f" {q.dense_dtype or 'dense'} ({q.ratio(s.bytes):.2f}×)"
    )
    if q.unmatched:
        lines.append(
            f"[yellow]{len(q.unmatched)} quantized module(s) that no group targets:[/]"
            f" {escape(', '.join(q.unmatched[:4]))}"
        )
    out.result(*lines)
    if q.contract is None:
        out.result(f"[dim]contract checks {escape(q.contract_error or '')}[/]")
        return
    table = findings_table(q.contract)
    if table is None:
        out.result("contract: [green]ok[/] (every verify check that needs no numbers passed)")
        return
    out.result(table)
