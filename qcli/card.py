"""The model card qcli writes next to its output: README.md with the hub's YAML front matter.

It says what was done (the command, the scheme, what was kept dense) so that a checkpoint
pushed with `hf upload` carries its evidence; `qcli eval --update-card` adds the accuracy
table. A card the source shipped is never lost: it follows qcli's section, under its own
heading (its license and language are carried into the front matter).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcli.planner import Plan

NAME = "README.md"
MARK = "<!-- qcli model card -->"
EVAL_BEGIN, EVAL_END = "<!-- qcli eval -->", "<!-- /qcli eval -->"
_FRONT = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)
_CARRIED = ("license", "license_name", "license_link", "language")


def is_qcli_card(path: Path) -> bool:
    """Whether `path` is a model card qcli wrote (its first 64 KB hold the marker)."""
    if path.name != NAME or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARK in f.read(1 << 16)
    except OSError:
        return False


def source_name(source: dict[str, Any]) -> str:
    return str(source.get("repo_id") or Path(str(source.get("path", "SRC"))).name)


def command(source: dict[str, Any], plan: Plan) -> str:
    """The quantize command that makes this output, from the plan's options (the source's
    name, not its path, and OUT: the card is the same wherever the folders are)."""
    opts = plan.options
    args = ["qcli", "quantize", source_name(source), "OUT", "--scheme", opts.scheme.name]
    if opts.lm_head:
        args.append("--lm-head")
    if list(opts.targets) != ["Linear"]:
        for t in opts.targets:
            args += ["--targets", t]
    for i in opts.ignore:
        args += ["--ignore", i]
    if not opts.default_ignore:
        args.append("--no-default-ignore")
    if opts.int8_max != 127:
        args += ["--int8-max", str(opts.int8_max)]
    return shlex.join(args)


def render(plan: Plan, record: dict[str, Any], source_card: str | None) -> str:
    """The whole README.md for the output of `plan`."""
    scheme = plan.scheme
    source = record.get("source") or {}
    front, body = _split(source_card)
    qtype = "int8" if scheme.qtype == "int8" else "fp8"
    lines = ["---"]
    if source.get("repo_id"):
        lines.append(f"base_model: {source['repo_id']}")
    lines += [
        "library_name: transformers",
        "tags:",
        "- compressed-tensors",
        f"- {qtype}",
        f"- {scheme.name.lower().replace('_', '-')}",
        "- vllm",
        "- qcli",
    ]
    lines += [ln for ln in front.splitlines() if ln.split(":")[0].strip() in _CARRIED]
    lines += ["---", MARK, "", f"# {source_name(source)}: {scheme.name}", ""]
    lines += [
        f"{scheme.name} ({scheme.description}) of {source.get('repo_id') or 'its source'},"
        " quantized with qcli, in the compressed-tensors format that vLLM and transformers"
        " load.",
        "",
        "```sh",
        command(source, plan),
        "```",
        "",
        "| | |",
        "| --- | --- |",
        f"| scheme | {scheme.name}: {scheme.description} |",
        f"| format | `{scheme.format}`, per-output-channel scales |",
        f"| quantized | {len(plan.quantized)} Linear modules |",
        f"| lm_head | {plan.head.summary()} |",
        f"| kept dense | {_dense(plan)} |",
        f"| tensor data | {plan.bytes_in / 1e6:.1f} MB → {plan.bytes_out / 1e6:.1f} MB |",
        "",
        EVAL_BEGIN,
        EVAL_END,
    ]
    if body.strip():
        lines += ["", "## The original model card", "", body.strip()]
    return "\n".join(lines) + "\n"


def _dense(plan: Plan) -> str:
    if not plan.dense_linear:
        return "embeddings and norms only"
    shown = ", ".join(f"`{n}`" for n in plan.dense_linear[:6])
    more = f" and {len(plan.dense_linear) - 6} more" if len(plan.dense_linear) > 6 else ""
    return f"{shown}{more} (in `ignore`); embeddings and norms"


def _split(card: str | None) -> tuple[str, str]:
    """(front matter, body) of a card."""
    if not card:
        return "", ""
    m = _FRONT.match(card)
    return (m.group(1), card[m.end() :]) if m else ("", card)


def add_eval(out: Path, report: Any) -> None:
    """Put `qcli eval`'s numbers into OUT's model card (replacing earlier ones)."""
    path = out / NAME
    text = path.read_text(encoding="utf-8") if is_qcli_card(path) else None
    if text is None or EVAL_BEGIN not in text:
        from qcli.errors import InputError

        raise InputError(f"{out} has no model card of qcli's to update (quantize writes one)")
    c = report.comparison
    k = c.kld
    table = "\n".join(
        [
            EVAL_BEGIN,
            "",
            f"## Accuracy: `qcli eval` ({c.tokens} tokens of {report.text}, windows of"
            f" {report.windows.ctx} tokens)",
            "",
            "| | PPL | ln(PPL ratio) | KL mean | KL p99 | top-1 agreement |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| reference | {c.reference.ppl:.3f} ± {c.reference.stderr:.3f} | | | | |",
            f"| {report.scheme} | {c.quantized.ppl:.3f} ± {c.quantized.stderr:.3f} |"
            f" {c.ln_ppl_ratio:+.4f} | {k.mean:.4f} ± {k.stderr:.4f} | {k.p99:.4f} |"
            f" {c.top1_agreement:.2%} |",
            "",
            f"Engine: {report.engines['quantized'].get('loader')},"
            f" {report.engines['quantized'].get('dtype')}."
            + (" Within qcli's thresholds." if report.ok else " **Outside qcli's thresholds.**"),
            EVAL_END,
        ]
    )
    start, end = text.index(EVAL_BEGIN), text.index(EVAL_END) + len(EVAL_END)
    path.write_text(text[:start] + table + text[end:], encoding="utf-8")
