"""What several views show alike: repeated layers collapsed into one row, contract findings,
a --filter regex."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rich import box
from rich.markup import escape
from rich.table import Table

from qcli.checks import Contract, sorted_findings
from qcli.errors import InputError

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def compile_filter(pattern: str) -> re.Pattern[str]:
    """A --filter regex, or a one-line InputError."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InputError(f"invalid --filter regular expression {pattern!r}: {e}") from None


def layer_pattern(name: str) -> str:
    """The name with its layer / expert indices replaced by ``*``: one row per repeated part."""
    return _LAYER_INDEX.sub("*", name)


@dataclass
class Collapsed:
    pattern: str  # e.g. "model.layers.*.mlp.experts.*.w1.weight"
    names: list[str]
    indices: str  # the first index's values, e.g. "0-31,40"; "" for a unique tensor
    layers: int = 1  # how many distinct first-index values

    @property
    def label(self) -> str:
        """e.g. "model.layers.{0-31}.mlp.down_proj.weight", "….experts.*.w1.weight ×256"."""
        if not self.indices:
            return self.pattern
        label = self.pattern.replace("*", "{" + self.indices + "}", 1)
        return label if len(self.names) == self.layers else f"{label} ×{len(self.names)}"


def collapse(names: list[str]) -> list[Collapsed]:
    """Group tensor names that differ only in layer indices, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(layer_pattern(n), []).append(n)
    out = []
    for pattern, members in groups.items():
        if len(members) == 1:
            out.append(Collapsed(members[0], members, ""))
            continue
        # members differ in some index; the first one (the layer) is the one people scan for
        first = {int(m.group()) for n in members if (m := _LAYER_INDEX.search(n))}
        out.append(Collapsed(pattern, members, _ranges(sorted(first)), len(first)))
    return out


def _ranges(values: list[int]) -> str:
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


def findings_table(contract: Contract) -> Table | None:
    """The contract findings, errors first, each with what a loader will do; None if none."""
    found = sorted_findings(contract.findings)
    if not found:
        return None
    errors = len(contract.errors)
    table = Table(
        title=f"Contract: {errors} error(s), {len(found) - errors} warning(s)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("", "subject", "problem", "what a loader does"):
        table.add_column(col)
    for f in found:
        mark = "[red]error[/]" if f.severity == "error" else "[yellow]warning[/]"
        table.add_row(mark, escape(f.subject), escape(f.problem), escape(f.consequence))
    return table
