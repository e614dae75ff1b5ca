"""One decision per tensor, from headers and config alone.

`inspect`, `quantize --dry-run`, `quantize` and `verify` all read the same Plan, so what a user
previews is exactly what gets written. No torch and no tensor data here.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qcli import kinds, rules
from qcli.errors import InputError, PlanError
from qcli.schemes import Scheme, quantization_config
from qcli.tensors import FLOAT_DTYPES, SINGLE_NAME, Checkpoint, Slot, natural_key

QUANTIZE, COPY = "quantize", "copy"
LM_HEAD = "lm_head"
# Tensor name suffixes that only a quantized checkpoint has.
QUANT_SUFFIXES = (".weight_scale", ".weight_packed", ".weight_zero_point", ".input_scale")


@dataclass
class TensorPlan:
    """The fate of one source tensor: which outputs it becomes and why."""

    source: str  # source tensor name
    action: str  # QUANTIZE or COPY
    module: str
    kind: str
    rule: str
    outputs: list[Slot]
    bytes_in: int
    note: str = ""  # e.g. "untied from model.embed_tokens.weight"

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.outputs)


@dataclass
class Options:
    scheme: Scheme
    targets: Sequence[str] = rules.DEFAULT_TARGETS
    ignore: Sequence[str] = ()
    lm_head: bool = False
    default_ignore: bool = True
    # An entry that matches nothing is almost always a typo that would silently quantize (or
    # keep) the wrong layers, so it stops the run unless the user opts out.
    allow_unmatched: bool = False
    # Largest int8 magnitude written. 127 is full range; 63 keeps every pairwise u8*s8 sum
    # inside int16, so oneDNN's int8 GEMM on x86 CPUs without VNNI (vLLM's CPU W8A8 kernel)
    # cannot saturate, at the cost of one bit of weight precision.
    int8_max: int = 127


@dataclass
class Plan:
    checkpoint: Checkpoint
    options: Options
    modules: dict[str, kinds.Module]
    tensors: list[TensorPlan]
    quantized: list[str]  # module names, natural order
    dense_linear: list[str]  # Linear modules kept dense (written to `ignore`)
    lm_head: str  # "quantized", "dense", "absent"
    untie: bool  # lm_head written from the tied embedding
    config: dict[str, Any]  # the output config.json
    fused: list[tuple[str, ...]]
    warnings: list[str] = field(default_factory=list)

    @property
    def scheme(self) -> Scheme:
        return self.options.scheme

    @property
    def bytes_in(self) -> int:
        return self.checkpoint.total_bytes

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)

    def counts(self) -> dict[str, int]:
        return dict(Counter(t.action for t in self.tensors))


def quantized_outputs(
    module: str, shape: tuple[int, ...], scale_dtype: str, scheme: Scheme
) -> list[Slot]:
    """The tensors a quantized Linear ``module`` of weight ``shape`` is stored as."""
    out, inp = shape
    scale = Slot(f"{module}.weight_scale", scale_dtype, (out, 1))
    if scheme.packed:
        return [
            Slot(f"{module}.weight_packed", "I32", (out, inp // 4)),
            scale,
            Slot(f"{module}.weight_shape", "I64", (2,)),
        ]
    return [Slot(f"{module}.weight", scheme.weight_dtype, shape), scale]


def refuse_quantized(ck: Checkpoint) -> None:
    qc = (ck.config or {}).get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise InputError(
            f"{ck.folder} is already quantized (quantization_config, quant_method={method});"
            " qcli quantizes dense checkpoints"
        )
    for name, t in ck.tensors.items():
        if name.endswith(QUANT_SUFFIXES) or t.dtype.startswith("F8"):
            raise InputError(f"{ck.folder} is already quantized: tensor {name!r} ({t.dtype})")


def _lm_head_name(modules: dict[str, kinds.Module]) -> str | None:
    heads = [m.name for m in modules.values() if m.role == "lm_head"]
    return heads[0] if heads else None


def _embedding_weight(ck: Checkpoint, modules: dict[str, kinds.Module]) -> str | None:
    """The input embedding table that a tied lm_head reuses."""
    vocab = _text_config(ck.config or {}).get("vocab_size")
    embeds = [
        m.weight
        for m in modules.values()
        if m.kind == "Embedding" and m.weight and m.role == "embedding"
    ]
    for w in embeds:
        if vocab is None or ck.tensors[w].shape[0] == vocab:
            return w
    return None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    sub = config.get("text_config")
    return sub if isinstance(sub, dict) and sub else config  # a malformed one is ignored


def set_untied(config: dict[str, Any]) -> None:
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False


def build(ck: Checkpoint, opts: Options) -> Plan:
    """Decide every tensor's fate; raises PlanError when the options cannot apply."""
    rules.validate(list(opts.targets) + list(opts.ignore))
    if not opts.targets:
        raise InputError("no --targets given")
    if opts.int8_max != 127 and (opts.scheme.kind != "int8" or not 1 <= opts.int8_max <= 127):
        raise InputError(
            f"--int8-max {opts.int8_max}: takes 1..127, and only with int8 schemes (W8A8, W8A16)"
        )
    refuse_quantized(ck)
    config = ck.config or {}
    shapes = {n: (t.dtype, t.shape) for n, t in ck.tensors.items()}
    try:
        modules = kinds.classify(shapes, config)
    except kinds.UnsupportedArchitecture as e:
        raise PlanError(str(e)) from None
    scheme = opts.scheme
    warnings = list(ck.warnings)

    tied = kinds.tied_embeddings(config)
    head = _lm_head_name(modules)
    embed_w = _embedding_weight(ck, modules) if head is None else None
    # A tied lm_head has no tensors on disk but is still an nn.Linear in every loader.
    head_name = head or (LM_HEAD if embed_w is not None and tied else None)

    selected: dict[str, rules.Match] = {}
    for m in modules.values():
        if m.kind != "Linear":
            hit = rules.first_match(opts.targets, m.name, m.kind)
            if hit and hit[1] != "regex" and m.weight is not None:
                raise PlanError(
                    f"target {hit[0]!r} selects {m.name} ({m.kind}); qcli quantizes Linear"
                    " layers only"
                )
            continue
        selected[m.name] = _decide_linear(m.name, m.role, head_name, opts)

    lm_match = None
    if head_name is not None:
        lm_match = selected.get(head_name) or _decide_linear(head_name, "lm_head", head_name, opts)
        selected.setdefault(head_name, lm_match)
    elif opts.lm_head:
        raise PlanError("--lm-head: this checkpoint has no lm_head (not a causal LM?)")

    untie = bool(head is None and head_name and lm_match and lm_match.selected)
    lm_state = "absent" if head_name is None else ("quantized" if lm_match.selected else "dense")

    plans: list[TensorPlan] = []
    owner = {t: m for m in modules.values() for t in m.tensors}
    for name, info in ck.tensors.items():
        m = owner.get(name)
        mod_name, kind = (m.name, m.kind) if m else (name.rsplit(".", 1)[0], "Other")
        match = selected.get(mod_name)
        if m is not None and match is not None and match.selected and name == m.weight:
            plans.append(
                _quant_plan(name, mod_name, info.dtype, info.shape, info.nbytes, match.rule, scheme)
            )
            continue
        if (
            kind == "Linear"
            and name == (m.weight if m else None)
            and info.dtype not in FLOAT_DTYPES
        ):
            raise InputError(f"tensor {name!r} is {info.dtype}; expected a float weight")
        rule = match.rule if match else f"not quantizable ({kind})"
        plans.append(
            TensorPlan(
                name, COPY, mod_name, kind, rule, [Slot(name, info.dtype, info.shape)], info.nbytes
            )
        )
    if untie:
        t = ck.tensors[embed_w]
        tp = _quant_plan(embed_w, head_name, t.dtype, t.shape, t.nbytes, lm_match.rule, scheme)
        tp.note = f"untied: lm_head quantized from {embed_w}; embedding kept dense"
        plans.append(tp)
        plans.sort(key=lambda p: natural_key(p.outputs[0].name))
        warnings.append(
            "tied embeddings: lm_head is written quantized from the embedding table and"
            " tie_word_embeddings is set to false (vLLM would drop a tied lm_head's scale)"
        )

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

    unmatched = [
        f"target {t!r} matches no module"
        for t in opts.targets
        if not any(rules.entry_matches(t, m.name, m.kind) for m in modules.values())
        and not (head_name and rules.entry_matches(t, head_name, "Linear"))
    ] + [
        f"ignore entry {i!r} matches no Linear module"
        for i in opts.ignore
        if not any(rules.entry_matches(i, n, "Linear") for n in selected)
    ]
    if unmatched and not opts.allow_unmatched:
        raise PlanError(f"{unmatched[0]} (check the spelling; --allow-unmatched to go on)")
    warnings.extend(unmatched)

    quantized = sorted((n for n, s in selected.items() if s.selected), key=natural_key)
    # GPT-2-style Conv1D layers stay dense (their weight is stored transposed), but vLLM builds
    # them as LinearBase, which the target "Linear" matches: they must be listed in ignore.
    conv1d = [m.name for m in modules.values() if m.kind == "Conv1D" and m.weight]
    dense_linear = sorted(
        [n for n, s in selected.items() if not s.selected] + conv1d, key=natural_key
    )
    fused = kinds.fused_groups(selected)
    for group in fused:
        states = {g: selected[g].selected for g in group}
        if len(set(states.values())) > 1:
            on = [g for g, s in states.items() if s]
            off = [f"{g} ({selected[g].rule})" for g, s in states.items() if not s]
            raise PlanError(
                f"vLLM fuses {', '.join(group)} into one layer, but the rules quantize"
                f" {', '.join(on)} and keep {', '.join(off)}; quantize all or none of them"
            )
    if not quantized:
        raise PlanError("the targets select no Linear layer: nothing would be quantized")
    if lm_state == "quantized" and not scheme.vllm_lm_head_ok:
        warnings.append(
            f"lm_head quantized with {scheme.name}: current vLLM cannot load an fp8 weight-only"
            " lm_head (use FP8_DYNAMIC, or keep lm_head dense)"
        )

    out_config = copy.deepcopy(config)
    targets = ([head_name] if lm_state == "quantized" else []) + ["Linear"]
    out_config["quantization_config"] = quantization_config(scheme, targets, dense_linear)
    if lm_state == "quantized" and tied:
        set_untied(out_config)
    return Plan(
        ck,
        opts,
        modules,
        plans,
        quantized,
        dense_linear,
        lm_state,
        untie,
        out_config,
        fused,
        warnings,
    )


def _decide_linear(
    name: str, role: str | None, head_name: str | None, opts: Options
) -> rules.Match:
    if name == head_name:
        if opts.lm_head:
            ign = rules.first_match(opts.ignore, name, "Linear")
            if ign:
                raise PlanError(f"--lm-head asked, but ignore entry {ign[0]!r} excludes {name}")
            return rules.Match(True, "--lm-head")
        role = "lm_head"
    return rules.decide(name, "Linear", role, opts.targets, opts.ignore, opts.default_ignore)


def _quant_plan(
    source: str,
    module: str,
    dtype: str,
    shape: tuple[int, ...],
    nbytes: int,
    rule: str,
    scheme: Scheme,
) -> TensorPlan:
    if dtype not in FLOAT_DTYPES:
        raise InputError(f"tensor {source!r} is {dtype}; expected a float weight to quantize")
    if len(shape) != 2 or 0 in shape:
        raise InputError(f"tensor {source!r} has shape {list(shape)}; a Linear weight is 2-D")
    if scheme.packed and shape[1] % 4:
        raise PlanError(
            f"{module}: {scheme.name} packs 4 int8 values per int32, but in_features={shape[1]}"
            " is not a multiple of 4"
        )
    scale_dtype = dtype if dtype in ("BF16", "F16", "F32") else "F32"
    return TensorPlan(
        source,
        QUANTIZE,
        module,
        "Linear",
        rule,
        quantized_outputs(module, shape, scale_dtype, scheme),
        nbytes,
    )


def shard_layout(plan: Plan, max_shard_size: int) -> list[tuple[str, list[TensorPlan]]]:
    """Split the tensor plans into output files, in order, a module's tensors kept together."""
    if max_shard_size <= 0:
        raise InputError("--max-shard-size: the size must be positive")
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tp in plan.tensors:
        if shards[-1] and size + tp.bytes_out > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tp)
        size += tp.bytes_out
    n = len(shards)
    if n == 1:
        return [(SINGLE_NAME, shards[0])]
    width = max(5, int(math.log10(n)) + 1)
    return [
        (f"model-{i + 1:0{width}d}-of-{n:0{width}d}.safetensors", s) for i, s in enumerate(shards)
    ]


def parse_size(text: str, option: str = "size") -> int:
    """ "5GB", "500MB", "2GiB", "1000000" -> bytes (decimal units as transformers uses);
    errors name `option`."""
    t = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    unit = next((u for u in units if t.endswith(u)), "B")
    num, mult = t.removesuffix(unit), units[unit]
    try:
        value = float(num)
    except ValueError:
        raise InputError(f"{option}: cannot read size {text!r} (e.g. 5GB, 500MB)") from None
    if not math.isfinite(value) or value <= 0 or int(value * mult) < 1:
        raise InputError(f"{option}: the size must be positive, got {text!r}")
    return int(value * mult)
