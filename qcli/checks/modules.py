"""The written config turned back into decisions, compared with the tensors on disk.

The read side mirrors the planner: the same module kinds (qcli.kinds), the same lm_head and
tie resolution (qcli.heads), the same matcher (qcli.rules, compressed-tensors' order) and the
same per-format layout (qcli.layout). For every Linear module the config decides "quantized
by group G" or "dense"; the tensors must say the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qcli import heads, kinds, layout, loaders, names
from qcli.checks.config import Group
from qcli.checks.findings import ERROR, NAN_LOGITS, READ_AS_FLOAT, WARNING, Contract, LmHead
from qcli.checks.tensors import check_quantized_module
from qcli.heads import Head
from qcli.loaders import FP8_WEIGHT_ONLY_HEAD
from qcli.rules import Matcher
from qcli.tensors import TensorInfo

# vLLM builds lm_head as ParallelLMHead: class `Linear` does not match it (format.md).
VLLM_HEAD_CLASS = "ParallelLMHead"


class Reading:
    """Which group of a written config quantizes each module, as a loader decides it."""

    def __init__(
        self,
        groups: Sequence[Group],
        ignore: Sequence[str],
        spellings: Callable[[str], list[str]] | None = None,
    ):
        self.groups = {g.name: g for g in groups}
        self.matcher = Matcher({g.name: g.targets for g in groups}, ignore, spellings)

    def group(self, name: str, cls: str = kinds.LINEAR) -> Group | None:
        hit = self.matcher.match(name, cls)
        return self.groups[hit.group] if hit is not None and hit.group is not None else None

    def ignored(self, name: str) -> bool:
        """Targeted, and kept dense by an ignore entry."""
        m = self.matcher
        return (
            m.target(name, kinds.LINEAR) is not None and m.ignored(name, kinds.LINEAR) is not None
        )


def check_modules(
    tensors: Mapping[str, TensorInfo],
    config: Mapping[str, Any],
    modules: Mapping[str, kinds.Module],
    groups: list[Group],
    ignore: list[str],
    result: Contract,
) -> None:
    """Every module's stored state against the config's decision for it (`tensors`: the
    checkpoint's, fused experts seen per expert: qcli.experts.view)."""
    spelled = names.Names(config)
    reading = Reading(groups, ignore, spelled.spellings if spelled else None)
    head = heads.resolve(modules, config, {n: (t.dtype, t.shape) for n, t in tensors.items()})
    linear = [m for m in modules.values() if m.kind == kinds.LINEAR and m.weight]
    selected = {m.name: reading.group(m.name) for m in linear}
    _check_linear(linear, selected, reading, tensors, result, kinds.model_types(config))
    _check_non_linear(modules, tensors, result)
    _check_targets(groups, linear, head, result, spelled)
    if spelled:
        _check_spellings(linear, Reading(groups, ignore), spelled, result)
    result.lm_head = _check_lm_head(head, tensors, groups, reading, selected, result)
    if head.virtual and result.lm_head and not result.lm_head.transformers:
        result.dense_linear.append(head.name)
    _check_fused(selected, result)
    if not any(g is not None for g in selected.values()):
        result.add(
            "config.targets",
            "quantization_config",
            "no Linear module is quantized (every target is ignored or matches nothing)",
            "the checkpoint runs dense; the quantization config only costs load time",
            WARNING,
        )


def _check_linear(
    linear: Sequence[kinds.Module],
    selected: Mapping[str, Group | None],
    reading: Reading,
    tensors: Mapping[str, TensorInfo],
    result: Contract,
    model_types: set[str],
) -> None:
    """Each Linear module: quantized exactly when its group says so, then its tensors."""
    experts: list[tuple[str, str | None]] = []  # quantized experts, and their format
    for m in linear:
        g = selected[m.name]
        on_disk = layout.state(m.name, tensors)
        if g is None:
            if on_disk != "dense":
                why = "is in ignore" if reading.ignored(m.name) else "is not targeted"
                result.add(
                    "tensors.outside_targets",
                    _subject(m.name, tensors),
                    f"stored quantized, but the module {why}",
                    READ_AS_FLOAT,
                )
            else:
                result.dense_linear.append(m.name)
            continue
        if on_disk == "dense":
            result.add(
                "tensors.dense_not_ignored",
                f"{m.name}.weight",
                f"left dense ({tensors[m.weight].dtype}) but matched by {g.name} and not in ignore",
                NAN_LOGITS,
            )
            continue
        if m.role == "expert" and g.layout is not None:
            experts.append((m.name, g.format))
        qm = check_quantized_module(m, g, tensors, result)
        if qm is not None:
            result.modules.append(qm)
    limited = [(n, f) for n, f in experts if loaders.transformers_experts(model_types, f, True)]
    if limited:  # one finding for all of them: a real MoE has thousands
        first, fmt = limited[0]
        result.add(
            "tensors.expert",
            first.rpartition(".experts.")[0] or first,
            f"{len(limited)} MoE expert projection(s) stored {fmt}, e.g. {first}",
            loaders.transformers_experts(model_types, fmt, True) or "",
            WARNING,
        )
        return
    # experts kept dense: still unloadable in transformers under an int-quantized config
    dense = [m.name for m in linear if m.role == "expert" and selected[m.name] is None]
    formats = {g.format for g in selected.values() if g is not None}
    fmt = "int-quantized" if "int-quantized" in formats else None
    why = loaders.transformers_experts(model_types, fmt, False) if dense else None
    if why:
        result.add(
            "tensors.expert",
            dense[0].rpartition(".experts.")[0] or dense[0],
            f"{len(dense)} MoE expert projection(s) kept dense under a {fmt} config, e.g."
            f" {dense[0]}",
            why,
            WARNING,
        )


def _check_non_linear(
    modules: Mapping[str, kinds.Module], tensors: Mapping[str, TensorInfo], result: Contract
) -> None:
    for m in modules.values():
        if m.kind == kinds.LINEAR and m.weight:
            continue
        stray = [t for t in m.tensors if layout.is_quant_tensor(t, tensors[t].dtype)]
        if stray and m.weight is None:
            result.add(
                "tensors.layout",
                stray[0],
                f"{m.name} has quantization tensors but no weight or weight_packed",
                "the model fails to load (a missing weight)",
            )
        elif stray:
            result.add(
                "tensors.outside_targets",
                stray[0],
                f"a quantized tensor of {m.name or 'the model root'} ({m.kind}), which no"
                " loader quantizes",
                READ_AS_FLOAT
                if stray[0].endswith(".weight")
                else "loaders reject it as an unexpected key or ignore it",
            )


def _check_spellings(
    linear: Sequence[kinds.Module], plain: Reading, spelled: names.Names, result: Contract
) -> None:
    """A vision-language model's config must decide each module alike under its disk name
    (vLLM's) and its loaded name (transformers', whose name compressed-tensors matches)."""
    for m in linear:
        loaded = spelled.loaded(m.name)
        if loaded == m.name:
            continue
        on_disk, in_memory = plain.group(m.name), plain.group(loaded)
        if on_disk == in_memory:
            continue
        how = "quantizes" if in_memory is not None else "leaves dense"
        result.add(
            "config.spelling",
            m.name,
            f"the config decides it by its disk name, but transformers 5 calls it {loaded},"
            f" which it {how}: an exact entry needs both spellings (or a regex that matches"
            " both)",
            "transformers finds no scale for it: garbage or NaN logits (vLLM reads it right)"
            if in_memory is not None
            else READ_AS_FLOAT + " (vLLM reads it right)",
        )


def _check_targets(
    groups: Sequence[Group],
    linear: Sequence[kinds.Module],
    head: Head,
    result: Contract,
    spelled: names.Names,
) -> None:
    pairs = [(m.name, kinds.LINEAR) for m in linear] + [(m.name, VLLM_HEAD_CLASS) for m in linear]
    if head.virtual:
        pairs += [(head.name, kinds.LINEAR), (head.name, VLLM_HEAD_CLASS)]
    for g in groups:
        spellings = spelled.spellings if spelled else None
        for t in Matcher(list(g.targets), (), spellings).unmatched_targets(pairs):
            result.add(
                "config.targets",
                f"{g.name}.targets",
                f"{t!r} matches no Linear module",
                "loaders quantize nothing with it (compressed-tensors warns)",
                WARNING,
            )


def _subject(module: str, tensors: Mapping[str, TensorInfo]) -> str:
    for leaf in (layout.WEIGHT, layout.PACKED, layout.SCALE):
        if f"{module}.{leaf}" in tensors:
            return f"{module}.{leaf}"
    return module


def _check_lm_head(
    head: Head,
    tensors: Mapping[str, TensorInfo],
    groups: list[Group],
    reading: Reading,
    selected: Mapping[str, Group | None],
    result: Contract,
) -> LmHead | None:
    """The vLLM rule (quantized ⇔ named in targets) and tied-embedding consistency."""
    name = head.name
    if name is None:
        named = [t for g in groups for t in g.targets if t == heads.LM_HEAD]
        if named:
            result.add(
                "lm_head.targets",
                "quantization_config targets",
                f"{named[0]!r} names lm_head, but the checkpoint has none",
                "vLLM looks for an lm_head scale that does not exist",
                WARNING,
            )
        return None
    group = reading.group(name) if head.virtual else selected.get(name)
    vllm_group = reading.group(name, VLLM_HEAD_CLASS)
    found = LmHead(
        name, layout.state(name, tensors), head.tied, group is not None, vllm_group is not None
    )
    if head.virtual:
        if found.transformers or found.vllm:
            result.add(
                "lm_head.tied",
                name,
                "tied to the embedding (no lm_head tensors) but quantized by the config"
                f" ({'named in targets' if found.vllm else 'class Linear matches it'}, not in"
                " ignore)",
                "transformers finds no lm_head scale (NaN logits); vLLM ties lm_head to the"
                " dense embedding and drops the scheme's scale",
            )
        return found
    _check_stored_head(found, vllm_group, tensors, result)
    return found


def _check_stored_head(
    head: LmHead, vllm_group: Group | None, tensors: Mapping[str, TensorInfo], result: Contract
) -> None:
    """An lm_head with tensors on disk, against its tie and against vLLM's reading."""
    name, on_disk = head.name, head.on_disk
    if head.tied and on_disk != "absent":
        result.add(
            "lm_head.tied",
            f"{name}.weight",
            "stored, but tie_word_embeddings is true",
            "vLLM ties lm_head to the embedding table and drops lm_head's tensors and scale"
            if on_disk == "quantized"
            else "loaders tie lm_head to the embedding and ignore this tensor",
            ERROR if on_disk == "quantized" else WARNING,
        )
    if on_disk == "quantized" and vllm_group is None:
        result.add(
            "lm_head.targets",
            _subject(name, tensors),
            "stored quantized, but lm_head is not named in targets"
            + (" (only class 'Linear' matches it)" if head.transformers else ""),
            "vLLM will run lm_head dense (class Linear does not match its ParallelLMHead) and"
            " fails on, or misreads, the int8/fp8 tensors",
        )
    elif on_disk == "quantized" and vllm_group.scheme and not vllm_group.scheme.vllm_lm_head_ok:
        result.add(
            "lm_head.scheme",
            _subject(name, tensors),
            f"quantized as {vllm_group.scheme.name} (fp8 weight-only)",
            FP8_WEIGHT_ONLY_HEAD,
            # A valid compressed-tensors checkpoint that one loader cannot serve: worth saying
            # loudly, not a broken checkpoint (quantize warns about it too).
            WARNING,
        )
    elif on_disk == "dense" and head.vllm and not head.transformers:
        result.add(
            "lm_head.targets",
            f"{name}.weight",
            "stored dense, but named in targets and not in ignore",
            "vLLM builds a quantized lm_head and finds no scale: it fails to load",
        )


def _check_fused(selected: Mapping[str, Group | None], result: Contract) -> None:
    for group in kinds.fused_groups(selected):
        sigs = {m: (selected[m].signature if selected[m] else "dense") for m in group}
        if len(set(sigs.values())) > 1:
            parts = ", ".join(
                f"{m} ({selected[m].name if selected[m] else 'dense'})" for m in group
            )
            result.add(
                "fused",
                group[0],
                f"vLLM fuses {parts} into one layer, but their schemes differ",
                "vLLM fails to load the fused layer",
            )
