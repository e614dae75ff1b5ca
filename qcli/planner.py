"""One decision per tensor, from headers and config alone: options in, a Plan out.

`inspect`, `quantize --dry-run`, `quantize` and `verify` all read the same Plan, so what a user
previews is exactly what gets written. Every tensor's plan carries what its executor needs (the
source tensor, the quantizer, the layout, the scale dtype), so qcli.convert reads nothing else.
No torch and no tensor data here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from qcli import dequant, experts, heads, kinds, layout, loaders, names, rules
from qcli.dequant import Stored
from qcli.errors import InputError, PlanError
from qcli.experts import Piece
from qcli.heads import Head
from qcli.loaders import FP8_WEIGHT_ONLY_HEAD
from qcli.plans import (  # noqa: F401  (re-exported: planner.Plan etc. are the plan's names)
    ABSENT,
    COPY,
    DECODE,
    DENSE,
    QUANTIZE,
    QUANTIZED,
    Decoded,
    HeadPlan,
    Plan,
    PlanOptions,
    Quantizer,
    TensorPlan,
)
from qcli.rules import Match, Matcher
from qcli.schemes import Scheme, quantization_config
from qcli.shards import Slot
from qcli.tensors import FLOAT_DTYPES, Checkpoint, TensorInfo, natural_key

# --- the steps ----------------------------------------------------------------------------


def build(ck: Checkpoint, opts: PlanOptions) -> Plan:
    """Decide every tensor's fate; raises PlanError when the options cannot apply."""
    _check_options(opts)
    stored = dequant.find(ck)  # a quantized release is decoded and quantized again
    _refuse_unreadable(ck, stored)
    config = {k: v for k, v in (ck.config or {}).items() if k != "quantization_config"}
    tensors, pieces = experts.view(ck.tensors, config)  # fused experts: one weight each
    if pieces and stored:
        raise PlanError("a quantized release with fused experts: qcli reads one or the other")
    shapes = {n: (t.dtype, t.shape) for n, t in tensors.items()}
    try:
        modules = kinds.classify(shapes, config)
    except kinds.UnsupportedArchitecture as e:
        raise PlanError(str(e)) from None
    head = heads.resolve(modules, config, shapes)
    _refuse_headless(head, config)
    spelled = names.Names(config)  # a VLM's modules answer to two names
    matcher = Matcher(list(opts.targets), list(opts.ignore), spelled.spellings if spelled else None)
    _refuse_non_linear_targets(modules, matcher)
    selected = _select(modules, head, opts, matcher)
    head_plan = _head_plan(head, selected, modules)
    plans = _tensor_plans(ck, tensors, modules, selected, head_plan, opts, {**stored, **pieces})
    plans = _keep_fused(ck, plans, pieces)
    _refuse_collisions(plans)
    warnings = list(ck.warnings) + _unmatched(modules, head, selected, matcher, opts)
    quantized = sorted((n for n, s in selected.items() if s.selected), key=natural_key)
    if not quantized:
        raise PlanError("the targets select no Linear layer: nothing would be quantized")
    fused = kinds.fused_groups(selected)
    _refuse_split_fused(fused, selected)
    # GPT-2-style Conv1D layers stay dense (their weight is stored transposed), but vLLM builds
    # them as LinearBase, which the target "Linear" matches: they must be listed in ignore.
    conv1d = [m.name for m in modules.values() if m.kind == kinds.CONV1D and m.weight]
    dense_linear = sorted(
        [n for n, s in selected.items() if not s.selected] + conv1d, key=natural_key
    )
    if head_plan.untie:
        warnings.append(
            "tied embeddings: lm_head is written quantized from the embedding table and"
            " tie_word_embeddings is set to false (vLLM would drop a tied lm_head's scale)"
        )
    if head_plan.state == QUANTIZED and not opts.scheme.vllm_lm_head_ok:
        warnings.append(f"lm_head quantized with {opts.scheme.name}: {FP8_WEIGHT_ONLY_HEAD}")
    moe = [m.name for m in modules.values() if m.role == "expert" and m.weight]
    moe_q = set(moe) & set(quantized)
    fmt = opts.scheme.layout.format
    limit = loaders.transformers_experts(kinds.model_types(config), fmt, bool(moe_q))
    if moe and limit:
        warnings.append(
            f"{len(moe)} MoE expert projections, {len(moe_q)} quantized ({opts.scheme.name}):"
            f" {limit}"
        )
    out_config = _output_config(config, opts.scheme, head_plan, dense_linear, spelled)
    return Plan(
        ck, opts, modules, plans, quantized, dense_linear, head_plan, out_config, fused, warnings
    )


def _check_options(opts: PlanOptions) -> None:
    rules.validate(list(opts.targets) + list(opts.ignore))
    if not opts.targets:
        raise InputError("no --targets given")
    if opts.int8_max != 127 and (opts.scheme.qtype != "int8" or not 1 <= opts.int8_max <= 127):
        raise InputError(
            f"--int8-max {opts.int8_max}: takes 1..127, and only with int8 schemes (W8A8, W8A16)"
        )


def _refuse_unreadable(ck: Checkpoint, stored: Mapping[str, Stored]) -> None:
    """A quantized tensor that is none of the weights qcli decodes (or their scales)."""
    known = set(stored) | dequant.consumed(stored)
    for name, t in ck.tensors.items():
        if name not in known and layout.proves_quantized(name, t.dtype):
            why = "" if stored else " and config.json does not say how (no quantization_config)"
            raise InputError(f"{ck.folder} is already quantized: tensor {name!r} ({t.dtype}){why}")


# Architecture suffixes of models with an output head over the vocabulary.
_LM_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _refuse_headless(head: Head, config: Mapping[str, Any]) -> None:
    archs = config.get("architectures")
    lm = isinstance(archs, list) and any(
        isinstance(a, str) and a.endswith(_LM_HEAD_ARCHITECTURES) for a in archs
    )
    if head.name is None and not head.tied and lm:
        raise PlanError(
            "config.json does not tie lm_head to the embedding (tie_word_embeddings: false),"
            " but the checkpoint holds no lm_head weight: loaders would start it from random"
            " values (a missing shard, or an index that leaves it out?)"
        )


def _refuse_non_linear_targets(modules: Mapping[str, kinds.Module], matcher: Matcher) -> None:
    for m in modules.values():
        if m.kind == kinds.LINEAR or m.weight is None:
            continue
        hit = matcher.target(m.name, m.kind)
        if hit and hit.how != rules.REGEX:
            raise PlanError(
                f"target {hit.entry!r} selects {m.name} ({m.kind}); qcli quantizes Linear"
                " layers only"
            )


def _select(
    modules: Mapping[str, kinds.Module], head: Head, opts: PlanOptions, matcher: Matcher
) -> dict[str, Match]:
    """Every Linear module (and a virtual lm_head) -> whether it is quantized, and why."""
    linear = [(m.name, m.role) for m in modules.values() if m.kind == kinds.LINEAR]
    if head.virtual:
        linear.append((head.name, "lm_head"))
    if head.name is None and opts.lm_head:
        raise PlanError("--lm-head: this checkpoint has no lm_head (not a causal LM?)")
    selected = {}
    for name, role in linear:
        if name == head.name and opts.lm_head:
            ignored = matcher.ignored(name, kinds.LINEAR)
            if ignored:
                raise PlanError(
                    f"--lm-head asked, but ignore entry {ignored.entry!r} excludes {name}"
                )
            selected[name] = Match(True, "--lm-head")
            continue
        role = "lm_head" if name == head.name else role
        selected[name] = rules.decide(name, kinds.LINEAR, role, matcher, opts.default_ignore)
    return selected


def _head_plan(
    head: Head, selected: Mapping[str, Match], modules: Mapping[str, kinds.Module]
) -> HeadPlan:
    if head.name is None:
        return HeadPlan(None, ABSENT, head.tied, False, False, None, head.embedding)
    match = selected[head.name]
    state = QUANTIZED if match.selected else DENSE
    untie = head.virtual and match.selected
    return HeadPlan(head.name, state, head.tied, head.virtual, untie, match.rule, head.embedding)


def _keep_fused(
    ck: Checkpoint, plans: list[TensorPlan], pieces: Mapping[str, Piece]
) -> list[TensorPlan]:
    """A fused tensor none of whose experts is quantized is copied as it is, where the
    loaders read it that way (qcli.experts: GraniteMoE in transformers)."""
    if not pieces:
        return plans
    split = {
        piece.source.name
        for tp in plans
        if (piece := pieces.get(tp.source)) is not None
        and (tp.action == QUANTIZE or piece.always_split)
    }
    out: list[TensorPlan] = []
    for tp in plans:
        piece = pieces.get(tp.source)
        if piece is None or piece.source.name in split:
            out.append(tp)
            continue
        if any(o.source == piece.source.name for o in out):
            continue
        info = ck.tensors[piece.source.name]
        slot = Slot(info.name, info.dtype, info.shape)
        rule = f"{tp.rule}; no expert quantized: the fused tensor copied as it is"
        out.append(TensorPlan(info.name, info, COPY, _parent(info.name), kinds.OTHER, rule, [slot]))
    return out


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _tensor_plans(
    ck: Checkpoint,
    tensors: Mapping[str, TensorInfo],
    modules: Mapping[str, kinds.Module],
    selected: Mapping[str, Match],
    head: HeadPlan,
    opts: PlanOptions,
    stored: Mapping[str, Decoded],
) -> list[TensorPlan]:
    plans: list[TensorPlan] = []
    owner = {t: m for m in modules.values() for t in m.tensors}
    release = {n: s for n, s in stored.items() if isinstance(s, Stored)}
    consumed = dequant.consumed(release)
    dense_dtype = _dense_dtype(ck)
    for name, info in tensors.items():
        if name in consumed or (release and name.endswith(".input_scale")):
            continue  # a source scale: the weight it decodes is written anew
        m = owner.get(name)
        mod_name, kind = (m.name, m.kind) if m else (name.rsplit(".", 1)[0], kinds.OTHER)
        match = selected.get(mod_name)
        if m is not None and match is not None and match.selected and name == m.weight:
            plans.append(_quantize(info, mod_name, match.rule, opts, stored.get(name), dense_dtype))
            continue
        if name in stored:  # kept dense: decoded from its stored form
            src = stored[name]
            rule = match.rule if match else f"not quantizable ({kind})"
            if isinstance(src, Piece):
                slot, note = Slot(name, info.dtype, info.shape), src.describe()
            else:
                slot = Slot(name, dense_dtype, info.shape)
                note = f"dequantized to {dense_dtype} ({src.family})"
            plans.append(
                TensorPlan(name, info, DECODE, mod_name, kind, rule, [slot], None, note, src)
            )
            continue
        if kind == kinds.LINEAR and m is not None and name == m.weight:
            if info.dtype not in FLOAT_DTYPES:
                raise InputError(f"tensor {name!r} is {info.dtype}; expected a float weight")
        if match is None:
            rule = f"not quantizable ({kind})"
        elif match.selected:  # e.g. a bias: its module is quantized, the tensor is copied
            rule = f"{name.rpartition('.')[2]} of a quantized module: copied"
        else:
            rule = match.rule
        plans.append(
            TensorPlan(name, info, COPY, mod_name, kind, rule, [Slot(name, info.dtype, info.shape)])
        )
    if head.untie:
        assert head.name is not None and head.embedding is not None
        embedding = ck.tensors[head.embedding]
        tp = _quantize(embedding, head.name, selected[head.name].rule, opts, None, dense_dtype)
        tp.note = f"untied: lm_head quantized from {head.embedding}; embedding kept dense"
        plans.append(tp)
        plans.sort(key=lambda p: natural_key(p.outputs[0].name))
    return plans


def _quantize(
    info: TensorInfo,
    module: str,
    rule: str,
    opts: PlanOptions,
    stored: Decoded | None,
    dense_dtype: str,
) -> TensorPlan:
    scheme = opts.scheme
    if info.dtype not in FLOAT_DTYPES and not isinstance(stored, Stored):
        raise InputError(
            f"tensor {info.name!r} is {info.dtype}; expected a float weight to quantize"
        )
    if len(info.shape) != 2 or 0 in info.shape:
        raise InputError(
            f"tensor {info.name!r} has shape {list(info.shape)}; a Linear weight is 2-D"
        )
    shape = (info.shape[0], info.shape[1])
    fmt = scheme.layout
    if fmt.packed and shape[1] % 4:
        raise PlanError(
            f"{module}: {scheme.name} packs 4 int8 values per int32, but in_features={shape[1]}"
            " is not a multiple of 4"
        )
    # in the model's dtype, as a dense source's: loaders build the scale parameter in the
    # weight's dtype and cast what they read into it, so a float32 scale would be rounded
    # after q was computed from it
    scale_dtype = layout.scale_dtype(dense_dtype if isinstance(stored, Stored) else info.dtype)
    qmax = opts.int8_max if scheme.qtype == "int8" else None
    quantizer = Quantizer(scheme.qtype, qmax, fmt, scale_dtype, shape)
    outputs = fmt.slots(module, shape, scale_dtype)
    note = stored.describe() if stored else ""
    return TensorPlan(
        info.name, info, QUANTIZE, module, kinds.LINEAR, rule, outputs, quantizer, note, stored
    )


def _dense_dtype(ck: Checkpoint) -> str:
    """The dtype a decoded weight kept dense is written in: the model's (config.json), else
    the dtype of its other float tensors, else bfloat16."""
    from qcli.tensors import DTYPES

    names = {torch_name: st for st, (_, torch_name) in DTYPES.items()}
    config = ck.config or {}
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and names.get(value.removeprefix("torch.")) in FLOAT_DTYPES:
            return names[value.removeprefix("torch.")]
    floats = [t.dtype for t in ck.tensors.values() if t.dtype in ("BF16", "F16")]
    return floats[0] if floats else "BF16"


def _refuse_collisions(plans: Sequence[TensorPlan]) -> None:
    # A source tensor may already carry a name qcli writes (e.g. `M.weight_shape` next to
    # `M.weight` under W8A16): two tensors for one slot would corrupt the shard.
    made: dict[str, str] = {}
    for tp in plans:
        for s in tp.outputs:
            if s.name in made:
                raise PlanError(
                    f"output tensor {s.name!r} would be written twice (from {made[s.name]!r}"
                    f" and {tp.source!r}); the source already holds a tensor of that name"
                )
            made[s.name] = tp.source


def _unmatched(
    modules: Mapping[str, kinds.Module],
    head: Head,
    selected: Mapping[str, Match],
    matcher: Matcher,
    opts: PlanOptions,
) -> list[str]:
    pairs = [(m.name, m.kind) for m in modules.values()]
    if head.virtual:
        pairs.append((head.name, kinds.LINEAR))
    linear = [(n, kinds.LINEAR) for n in selected]
    unmatched = [f"target {t!r} matches no module" for t in matcher.unmatched_targets(pairs)] + [
        f"ignore entry {i!r} matches no Linear module" for i in matcher.unmatched_ignores(linear)
    ]
    if unmatched and not opts.allow_unmatched:
        raise PlanError(f"{unmatched[0]} (check the spelling; --allow-unmatched to go on)")
    return unmatched


def _refuse_split_fused(fused: Sequence[tuple[str, ...]], selected: Mapping[str, Match]) -> None:
    for group in fused:
        states = {g: selected[g].selected for g in group}
        if len(set(states.values())) > 1:
            on = [g for g, s in states.items() if s]
            off = [f"{g} ({selected[g].rule})" for g, s in states.items() if not s]
            raise PlanError(
                f"vLLM fuses {', '.join(group)} into one layer, but the rules quantize"
                f" {', '.join(on)} and keep {', '.join(off)}; quantize all or none of them"
            )


def _output_config(
    config: Mapping[str, Any],
    scheme: Scheme,
    head: HeadPlan,
    dense_linear: list[str],
    spelled: names.Names,
) -> dict[str, Any]:
    out = copy.deepcopy(dict(config))
    # vLLM quantizes its ParallelLMHead only when lm_head is named in targets
    targets = ([head.name] if head.state == QUANTIZED else []) + ["Linear"]
    # exact names in both spellings: compressed-tensors matches transformers' module names,
    # vLLM maps either spelling onto its own (qcli.names)
    out["quantization_config"] = quantization_config(
        scheme, spelled.both(targets), spelled.both(dense_linear)
    )
    if head.state == QUANTIZED and head.tied:
        heads.untie(out)
    return out
