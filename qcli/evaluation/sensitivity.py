"""Which layers a scheme hurts: one group quantized at a time, in memory, with qcli's own math.

The dense model loads once. For each group its weights are replaced by their quantized values
(qcli.quant: per-channel scales, the values quantize writes) and, for schemes with dynamic
activations, its inputs are quantized per token as vLLM does (qcli.gemm); the text is scored
against the reference pass, and the group is restored. Groups:

- ``lm_head`` alone (is quantizing it worth it on this model?);
- each projection kind across all layers: q, k, v, o, gate, up, down (names as on disk);
- with ``per_layer``, each layer.

vLLM loads q/k/v and gate/up as one layer each, so a checkpoint can only keep them dense
together: the budget (which groups to ``--ignore`` to stay within a KL budget) works on those
units (lm_head, q/k/v, o, gate/up, down, ...), each costing the sum of its kinds' KL (the
groups' costs add up to first order; the README shows how close the estimate is).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcli import gemm, kinds, planner, quant
from qcli.errors import InputError
from qcli.evaluation import windows as windowing
from qcli.evaluation.engines import TransformersModel, compute_dtype
from qcli.evaluation.scoring import reference_pass, score
from qcli.evaluation.stats import Comparison
from qcli.jsondata import number
from qcli.schemes import Scheme


@dataclass
class GroupResult:
    name: str
    modules: list[str]
    comparison: Comparison
    ppl_change: float  # PPL_q / PPL_ref - 1

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "modules": len(self.modules),
            **self.comparison.to_json(),
            "ppl_change": number(self.ppl_change),
        }


@dataclass
class Sensitivity:
    scheme: str
    reference_ppl: float
    tokens: int
    ranked: list[GroupResult]
    units: dict[str, list[str]]  # fused unit -> its groups (what --ignore can keep dense)
    budget: float | None = None
    ignore: list[str] = field(default_factory=list)  # --ignore entries meeting the budget
    budget_estimate: float = 0.0

    @property
    def total_estimate(self) -> float:
        return sum(g.comparison.kld.mean for g in self.ranked if g.name in self._kind_groups())

    def _kind_groups(self) -> set[str]:
        return {g for members in self.units.values() for g in members}

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "reference_ppl": number(self.reference_ppl),
            "tokens": self.tokens,
            "groups": [g.to_json() for g in self.ranked],
            "units": self.units,
            "kl_estimate_all": number(self.total_estimate),
            "kl_budget": self.budget,
            "ignore": self.ignore,
            "kl_estimate_with_ignore": number(self.budget_estimate),
        }


def run(
    src: Path,
    scheme: Scheme,
    text: str,
    *,
    ctx: int,
    max_tokens: int | None,
    per_layer: bool = False,
    kl_budget: float | None = None,
    ignore: Sequence[str] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> Sensitivity:
    from qcli import source

    plan = planner.build(
        source.open_checkpoint(src), planner.PlanOptions(scheme, lm_head=True, ignore=tuple(ignore))
    )
    groups = _groups(plan, per_layer)
    dtype = compute_dtype()
    model = TransformersModel(src, dtype)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
        wins = windowing.build(windowing.tokenize(tok, text), tok.bos_token_id, ctx, max_tokens)
        settings = {"engine": "transformers", "dtype": str(dtype)}
        base, _ = reference_pass(model, src, wins, settings, progress)
        found = []
        for i, (name, members) in enumerate(groups.items()):
            with _quantized(model.model, members, scheme):
                comparison = score(model, wins, base, None)
            ppl_change = comparison.quantized.ppl / comparison.reference.ppl - 1
            found.append(GroupResult(name, members, comparison, ppl_change))
            if progress:
                progress(f"group {name}", i + 1, len(groups))
    finally:
        model.close()
    found.sort(key=lambda g: -g.comparison.kld.mean)
    result = Sensitivity(
        scheme.name, found[0].comparison.reference.ppl, wins.tokens, found, _units(groups)
    )
    if kl_budget is not None:
        head = plan.head.name if plan.head.state == planner.QUANTIZED else None
        _meet_budget(result, kl_budget, head)
    return result


# --- the groups ---------------------------------------------------------------------------

_LAYER = re.compile(r"^(?P<prefix>.*?layers\.)(?P<index>\d+)\.")


def _groups(plan: planner.Plan, per_layer: bool) -> dict[str, list[str]]:
    """lm_head, each projection kind (the module's last name), optionally each layer."""
    head = plan.head.name if plan.head.state == planner.QUANTIZED else None
    groups: dict[str, list[str]] = {}
    if head:
        groups[head] = [head]
    for name in plan.quantized:
        if name != head:
            groups.setdefault(name.rpartition(".")[2], []).append(name)
    if per_layer:
        for name in plan.quantized:
            m = _LAYER.match(name)
            if m and name != head:
                groups.setdefault(f"layer {m['index']}", []).append(name)
    if not groups:
        raise InputError("no quantizable Linear layer to measure")
    return groups


def _units(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """The kinds vLLM fuses into one layer (q/k/v, gate/up, ...) as one unit; the rest alone."""
    kinds_present = [g for g in groups if not g.startswith("layer ")]
    units: dict[str, list[str]] = {}
    taken: set[str] = set()
    example = {g: groups[g][0] for g in kinds_present}
    for fused in kinds.fused_groups(example.values()):
        members = [g for g in kinds_present if example[g] in fused]
        if len(members) > 1:
            units["/".join(members)] = members
            taken |= set(members)
    for g in kinds_present:
        if g not in taken:
            units[g] = [g]
    return units


def ignore_entry(group: str, head: str | None = None) -> str:
    """The --ignore entry that keeps one kind dense across all layers."""
    if group == head or "." in group:
        return group
    return f"re:.*\\.{re.escape(group)}$"


def _meet_budget(s: Sensitivity, budget: float, head: str | None) -> None:
    """Keep the costliest units dense until the estimated KL (the sum over the units still
    quantized) fits the budget."""
    cost = {g.name: g.comparison.kld.mean for g in s.ranked}
    units = sorted(s.units.items(), key=lambda u: -sum(cost[g] for g in u[1]))
    total = sum(cost[g] for _, members in units for g in members)
    ignore = []
    for _, members in units:
        if total <= budget:
            break
        total -= sum(cost[g] for g in members)
        ignore += [ignore_entry(g, head) for g in members]
    s.budget, s.ignore, s.budget_estimate = budget, ignore, total


# --- one group quantized in memory ----------------------------------------------------------


class _quantized:  # noqa: N801  (a context manager that reads like a function)
    """The group's weights replaced by their quantized values, inputs quantized per token for
    dynamic schemes; everything put back on exit (a tied lm_head is untied meanwhile)."""

    def __init__(self, model: torch.nn.Module, members: list[str], scheme: Scheme):
        self.model, self.members, self.scheme = model, members, scheme
        self.saved: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
        self.hooks: list[Any] = []

    def __enter__(self) -> None:
        modules = dict(self.model.named_modules())
        for name in self.members:
            module = modules.get(name)
            if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise InputError(f"sensitivity: the model has no Linear {name!r}")
            original = module.weight
            q, s = quant.quantize_weight(original.detach(), self.scheme.qtype, original.dtype)
            module.weight = torch.nn.Parameter(quant.dequantize(q, s, original.dtype), False)
            self.saved.append((module, original))
            if self.scheme.dynamic_activations:
                self.hooks.append(module.register_forward_pre_hook(self._quantize_input))

    def _quantize_input(self, module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        if self.scheme.qtype == "int8":
            xq, scale = gemm.quantize_activations_int8(flat)
        else:
            xq, scale = gemm.quantize_activations_fp8(flat)
        x_hat = (xq.float() * scale).to(x.dtype).reshape(x.shape)
        return (x_hat, *args[1:])

    def __exit__(self, *exc: Any) -> None:
        for h in self.hooks:
            h.remove()
        for module, original in self.saved:
            module.weight = original  # the same Parameter: a tied head is tied again
