"""Does a quantized checkpoint keep the compressed-tensors contract (shared/format.md)?

Config and tensors are checked against each other from headers, plus the few small tensors
whose values the contract constrains (scales, packed shapes), read as raw bytes. No weight is
computed and torch is never imported: `qcli inspect` runs this on any checkpoint.

Every finding names the config key or tensor and what a real loader does with it, because
"verify failed" is only useful when it says why the output would be garbage.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qcli import kinds, rules
from qcli.errors import CheckpointError, InputError
from qcli.schemes import Scheme, scheme_from_group
from qcli.tensors import (
    FLOAT_DTYPES,
    INDEX_NAME,
    Checkpoint,
    TensorInfo,
    natural_key,
    open_checkpoint,
)

ERROR, WARNING = "error", "warning"

# Keys a config group may hold (compressed-tensors' QuantizationScheme, extra="forbid").
GROUP_KEYS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
# QuantizationArgs keys every compressed-tensors release since 0.7 accepts; vLLM images pin
# older releases, and an unknown key there is a validation error at load time.
ARG_KEYS = frozenset(
    {
        "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure",
        "dynamic", "actorder", "observer", "observer_kwargs",
    }
)  # fmt: skip
# Accepted by compressed-tensors 0.20, rejected by the releases older vLLM images pin.
NEW_ARG_KEYS = frozenset({"scale_dtype", "zp_dtype"})
FORMATS = frozenset(
    {
        "dense", "int-quantized", "float-quantized", "naive-quantized", "pack-quantized",
        "mixed-precision", "sparse-bitmask", "sparse-24-bitmask", "marlin-24",
        "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized",
        "mxfp8-quantized",
    }
)  # fmt: skip
SCALE_DTYPES = ("F32", "BF16", "F16")
# Names compressed-tensors gives a quantized Linear's parameters.
Q_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "input_scale")
LOADABLE_FILE_FORMATS = ("pt", "tf", "flax", "mlx")  # transformers refuses other values

# Consequences shared by several findings.
READ_AS_FLOAT = "transformers will read the stored int8/fp8 values as float weights (garbage)"
# What transformers 5.24 / compressed-tensors 0.20 do, checked by tests/interop.
NAN_LOGITS = (
    "transformers finds no scale and leaves it uninitialized: garbage or NaN logits;"
    " vLLM fails to load it"
)


@dataclass(frozen=True)
class Finding:
    """One broken (error) or risky (warning) part of the contract, and what a loader does."""

    check: str  # a stable short id, e.g. "config.format", "tensors.scale"
    subject: str  # the config key, tensor or module it is about
    problem: str
    consequence: str
    severity: str = ERROR

    def __str__(self) -> str:
        return f"{self.subject}: {self.problem}; {self.consequence}"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class QuantModule:
    """A quantized Linear whose tensors match its scheme: what the numeric checks need."""

    name: str
    role: str | None
    group: str
    scheme: Scheme
    weight: TensorInfo  # `.weight` (int8 / fp8) or `.weight_packed` (int32)
    scale: TensorInfo
    shape: tuple[int, int]  # the dense weight's [out, in]


@dataclass
class LmHead:
    """How each loader will treat lm_head."""

    name: str | None
    on_disk: str  # "quantized", "dense", "absent"
    tied: bool  # the config ties it to the input embedding
    transformers: bool  # quantized in transformers (class Linear matches it)
    vllm: bool  # quantized in vLLM (only a name or regex matches ParallelLMHead)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Contract:
    findings: list[Finding] = field(default_factory=list)
    modules: list[QuantModule] = field(default_factory=list)
    lm_head: LmHead | None = None
    dense_linear: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(
        self, check: str, subject: str, problem: str, consequence: str, severity: str = ERROR
    ) -> None:
        self.findings.append(Finding(check, subject, problem, consequence, severity))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.findings) - len(self.errors),
            "findings": [f.to_json() for f in self.findings],
            "quantized_modules": len(self.modules),
            "dense_linear_modules": self.dense_linear,
            "lm_head": self.lm_head.to_json() if self.lm_head else None,
        }


# --- entry points -------------------------------------------------------------------------


def check_folder(folder: Path) -> tuple[Checkpoint | None, Contract]:
    """Open a checkpoint folder and check it; a malformed index or shard is a finding.

    Raises InputError only for input that is not a checkpoint at all (exit code 2).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a checkpoint folder: {folder}")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no config.json (not a Hugging Face checkpoint?)")
    if not (folder / INDEX_NAME).exists() and not any(folder.glob("*.safetensors")):
        raise InputError(f"{folder}: no *.safetensors weights found")
    try:
        ck = open_checkpoint(folder)
    except CheckpointError as e:
        result = Contract()
        result.add(
            "files", str(folder), str(e), "loaders fail to open the checkpoint or miss tensors"
        )
        return None, result
    return ck, check(ck)


def is_quantized(ck: Checkpoint) -> bool:
    """Whether a checkpoint claims quantization or holds quantized tensors."""
    return bool((ck.config or {}).get("quantization_config")) or bool(_quantized_tensors(ck))


def check(ck: Checkpoint) -> Contract:
    """Every contract check of a quantized checkpoint that headers and scales can decide."""
    result = Contract()
    _check_files(ck, result)
    config = ck.config or {}
    qc = config.get("quantization_config")
    if not qc:
        stray = _quantized_tensors(ck)
        result.add(
            "config.quantization_config",
            "config.json",
            "no quantization_config"
            + (f", but {len(stray)} tensors are quantized (e.g. {stray[0]})" if stray else ""),
            "loaders treat the checkpoint as dense: " + READ_AS_FLOAT,
        )
        return result
    if not isinstance(qc, dict):
        result.add(
            "config.quantization_config",
            "quantization_config",
            "is not an object",
            "transformers and vLLM fail to parse it",
        )
        return result
    groups = _check_config(qc, result)
    dense_config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        modules = kinds.classify(
            {n: (t.dtype, t.shape) for n, t in ck.tensors.items()}, dense_config
        )
    except kinds.UnsupportedArchitecture as e:
        raise InputError(f"cannot tell the checkpoint's module kinds: {e}") from None
    ignore = _valid(qc.get("ignore") or [])
    _check_modules(ck, config, modules, groups, ignore, result)
    return result


# --- files and index ----------------------------------------------------------------------


def _check_files(ck: Checkpoint, result: Contract) -> None:
    for w in ck.warnings:
        result.add("index", INDEX_NAME, w, "those tensors are invisible to loaders", WARNING)
    for fname, meta in ck.metadata.items():
        fmt = meta.get("format")
        if fmt is None:
            result.add(
                "files.metadata",
                fname,
                'no __metadata__ {"format": "pt"}',
                "transformers loads it, but tools that check the framework tag may not",
                WARNING,
            )
        elif fmt not in LOADABLE_FILE_FORMATS:
            result.add(
                "files.metadata",
                fname,
                f"__metadata__ format is {fmt!r}",
                "transformers refuses to load the file",
            )
    if not (ck.folder / INDEX_NAME).exists():
        return
    listed = {f.name for f in ck.files}
    for extra in sorted(p.name for p in ck.folder.glob("*.safetensors") if p.name not in listed):
        result.add(
            "index",
            extra,
            f"not named in {INDEX_NAME}",
            "loaders read the index and ignore this file (a leftover of another write?)",
            WARNING,
        )
    import json

    try:
        index = json.loads((ck.folder / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # open_checkpoint parsed it already; a race is not ours to report
    total = (index.get("metadata") or {}).get("total_size")
    actual = sum(t.nbytes for t in ck.tensors.values())
    if total is None:
        result.add(
            "index.total_size",
            INDEX_NAME,
            "no metadata.total_size",
            "loaders ignore it, but the hub and download tools show a wrong size",
            WARNING,
        )
    elif total != actual:
        result.add(
            "index.total_size",
            INDEX_NAME,
            f"metadata.total_size is {total} but the mapped tensors hold {actual} bytes",
            "loaders ignore it, but it shows the index was not written with these shards",
            WARNING,
        )


def _quantized_tensors(ck: Checkpoint) -> list[str]:
    return [n for n, t in ck.tensors.items() if _is_quant_tensor(n, t)]


def _is_quant_tensor(name: str, t: TensorInfo) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf in Q_PARAMS or (leaf == "weight" and t.dtype not in FLOAT_DTYPES)


# --- config -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    name: str
    targets: tuple[str, ...]
    format: str | None
    weight_type: str | None  # "int" / "float"
    layout: str | None  # expected weight dtype: "I8", "F8_E4M3", "packed"; None: unusable
    scheme: Scheme | None
    signature: str  # what must be equal across a fused layer's parts


def _check_config(qc: dict[str, Any], result: Contract) -> list[_Group]:
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        result.add(
            "config.quant_method",
            "quantization_config.quant_method",
            f"is {method!r}, not 'compressed-tensors'",
            "transformers and vLLM pick another quantizer, or none, and misread the tensors",
        )
    status = qc.get("quantization_status")
    if status != "compressed":
        result.add(
            "config.quantization_status",
            "quantization_config.quantization_status",
            "missing" if status is None else f"is {status!r}, not 'compressed'",
            READ_AS_FLOAT,
        )
    top = qc.get("format")
    if top is None:
        result.add(
            "config.format",
            "quantization_config.format",
            "missing",
            "vLLM chooses its kernel by format and finds none; older transformers /"
            " compressed-tensors releases treat the weights as dense: " + READ_AS_FLOAT,
        )
    elif not isinstance(top, str) or top not in FORMATS:
        result.add(
            "config.format",
            "quantization_config.format",
            f"{top!r} is not a compressed-tensors format",
            "compressed-tensors rejects the config",
        )
    ignore = qc.get("ignore")
    if ignore is not None and (
        not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore)
    ):
        result.add(
            "config.ignore",
            "quantization_config.ignore",
            "is not a list of strings",
            "compressed-tensors rejects the config",
        )
    for entry in ignore if isinstance(ignore, list) else []:
        if isinstance(entry, str):
            _check_entry(entry, "ignore", result)
    if qc.get("kv_cache_scheme"):
        result.add(
            "config.kv_cache_scheme",
            "quantization_config.kv_cache_scheme",
            "set; qcli verify does not check kv-cache scales",
            "vLLM quantizes the kv cache with the scales it finds",
            WARNING,
        )
    raw = qc.get("config_groups")
    if not isinstance(raw, dict) or not raw:
        result.add(
            "config.config_groups",
            "quantization_config.config_groups",
            "missing or empty",
            "loaders quantize nothing: " + READ_AS_FLOAT,
        )
        return []
    groups = [g for name, body in raw.items() if (g := _check_group(name, body, result))]
    formats = {g.format for g in groups if g.format}
    if top is not None and formats:
        want = formats.pop() if len(formats) == 1 else "mixed-precision"
        if top != want:
            result.add(
                "config.format",
                "quantization_config.format",
                f"top-level format {top!r} disagrees with the groups' {want!r}",
                "transformers decompresses with the top-level format, vLLM picks kernels by the"
                " group's: one of them computes garbage",
            )
    return groups


def _check_entry(entry: str, where: str, result: Contract) -> None:
    try:
        rules.validate([entry])
    except InputError as e:
        result.add(
            f"config.{where}",
            f"quantization_config {where} entry {entry!r}",
            str(e),
            "compressed-tensors and vLLM fail on it",
        )


def _valid(entries: Any) -> list[str]:
    """The entries that can be matched at all (a broken regex is reported on its own)."""
    out = []
    for e in entries if isinstance(entries, list) else []:
        try:
            rules.validate([e])
        except (InputError, TypeError, AttributeError):
            continue
        out.append(e)
    return out


def _check_group(name: str, body: Any, result: Contract) -> _Group | None:
    subject = f"config_groups.{name}"
    if not isinstance(body, dict):
        result.add(
            "config.group",
            subject,
            "is not an object (qcli verify reads explicit scheme groups)",
            "cannot tell how its modules are stored",
        )
        return None
    extra = sorted(set(body) - GROUP_KEYS)
    if extra:
        result.add(
            "config.group_keys",
            subject,
            f"unknown keys {extra}",
            "compressed-tensors validates groups strictly and fails to load the config",
        )
    targets = body.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        result.add(
            "config.targets",
            f"{subject}.targets",
            "missing, empty or not a list of strings",
            "the group quantizes nothing",
        )
        targets = []
    for t in targets:
        _check_entry(t, "targets", result)
    weights = body.get("weights")
    acts = body.get("input_activations")
    for key, args in (("weights", weights), ("input_activations", acts)):
        if args is not None:
            _check_args(f"{subject}.{key}", args, result)
    if body.get("output_activations"):
        result.add(
            "config.scheme",
            f"{subject}.output_activations",
            "set; qcli's schemes quantize no outputs",
            "verify cannot reproduce what the loader computes",
        )
    fmt = body.get("format")
    if fmt is None:
        result.add(
            "config.format",
            f"{subject}.format",
            "missing",
            "loaders fall back to the top-level format, and releases disagree on how",
        )
    elif not isinstance(fmt, str) or fmt not in FORMATS:
        result.add(
            "config.format",
            f"{subject}.format",
            f"{fmt!r} is not a compressed-tensors format",
            "compressed-tensors rejects the config",
        )
        fmt = None
    wtype = weights.get("type") if isinstance(weights, dict) else None
    layout = _layout(fmt, wtype, weights)
    if weights is not None and layout is None and fmt is not None:
        result.add(
            "config.format",
            f"{subject}.format",
            f"{fmt!r} cannot store {_describe_args(weights)} weights",
            "compressed-tensors decompresses the tensors with the wrong compressor (garbage)"
            " or fails to load",
        )
    if weights is None:
        result.add(
            "config.scheme",
            f"{subject}.weights",
            "missing",
            "the group leaves weights dense: " + READ_AS_FLOAT,
        )
    elif not _per_channel_8bit(weights):
        result.add(
            "config.scheme",
            f"{subject}.weights",
            f"{_describe_args(weights)}: qcli verify checks 8-bit symmetric per-channel"
            " static weights only",
            "the numeric checks cannot run for this group",
        )
        layout = None
    if acts is not None and not _per_token_dynamic(acts, wtype):
        result.add(
            "config.scheme",
            f"{subject}.input_activations",
            f"{_describe_args(acts)}: qcli verify checks 8-bit symmetric per-token dynamic"
            " activations of the weights' type only",
            "the numeric checks cannot run for this group",
        )
        layout = None
    if wtype == "int" and not acts and layout and fmt != "pack-quantized":
        result.add(
            "config.format",
            f"{subject}.format",
            f"int8 weight-only written as {fmt!r}",
            "vLLM cannot pick a kernel for it (int8 weight-only loads as 'pack-quantized')",
        )
    scheme = scheme_from_group(body) if layout else None
    if layout and scheme is None:
        result.add(
            "config.scheme",
            subject,
            f"format {fmt!r} with {_describe_args(weights)} weights is none of qcli's presets",
            "verify checks its tensors but runs no numeric check for it",
            WARNING,
        )
    signature = repr((fmt, _norm_args(weights), _norm_args(acts)))
    return _Group(name, tuple(_valid(targets)), fmt, wtype, layout, scheme, signature)


def _check_args(subject: str, args: Any, result: Contract) -> None:
    if not isinstance(args, dict):
        result.add("config.scheme", subject, "is not an object", "compressed-tensors rejects it")
        return
    unknown = sorted(set(args) - ARG_KEYS - NEW_ARG_KEYS)
    if unknown:
        result.add(
            "config.arg_keys",
            subject,
            f"unknown keys {unknown}",
            "compressed-tensors validates quantization args strictly and fails to load",
        )
    newer = sorted(set(args) & NEW_ARG_KEYS)
    if newer:
        result.add(
            "config.arg_keys",
            subject,
            f"keys {newer} are recent",
            "the compressed-tensors releases older vLLM images pin reject them",
            WARNING,
        )


def _layout(fmt: Any, wtype: Any, weights: Any) -> str | None:
    if not isinstance(weights, dict) or weights.get("num_bits") != 8:
        return None
    if fmt == "pack-quantized" and wtype == "int":
        return "packed"
    if fmt == "int-quantized" and wtype == "int":
        return "I8"
    if fmt == "float-quantized" and wtype == "float":
        return "F8_E4M3"
    if fmt == "naive-quantized" and wtype in ("int", "float"):
        return "I8" if wtype == "int" else "F8_E4M3"
    return None


def _per_channel_8bit(w: Any) -> bool:
    return (
        isinstance(w, dict)
        and w.get("num_bits") == 8
        and w.get("type") in ("int", "float")
        and w.get("symmetric", True) is True
        and w.get("strategy") == "channel"
        and not w.get("dynamic", False)
        and w.get("group_size") is None
    )


def _per_token_dynamic(a: Any, wtype: Any) -> bool:
    return (
        isinstance(a, dict)
        and a.get("num_bits") == 8
        and a.get("type") == wtype
        and a.get("symmetric", True) is True
        and a.get("strategy") == "token"
        and a.get("dynamic") is True
    )


def _describe_args(args: Any) -> str:
    if not isinstance(args, dict):
        return "unreadable"
    return (
        f"{args.get('type')}{args.get('num_bits')} {args.get('strategy')}"
        f"{' asymmetric' if args.get('symmetric') is False else ''}"
        f"{' dynamic' if args.get('dynamic') else ''}"
    )


def _norm_args(args: Any) -> Any:
    if not isinstance(args, dict):
        return args
    keys = ("num_bits", "type", "symmetric", "strategy", "dynamic", "group_size")
    return tuple(args.get(k) for k in keys)


# --- modules and tensors ------------------------------------------------------------------

# vLLM builds lm_head as ParallelLMHead: class `Linear` does not match it (format.md).
_VLLM_HEAD_CLASS = "ParallelLMHead"


def _match(groups: Sequence[_Group], ignore: Sequence[str], name: str, cls: str) -> _Group | None:
    """The group that quantizes module `name` of class `cls` in a loader, or None.

    compressed-tensors' precedence (quantization/lifecycle/apply.py): ignore wins; then the
    most specific matching target decides, an exact name before a regex before a class; a
    target listed in several groups belongs to the last of them.
    """
    if rules.first_match(ignore, name, cls):
        return None
    owner: dict[str, _Group] = {}
    for g in groups:
        for t in g.targets:
            owner[t] = g
    ordered = sorted(owner, key=lambda t: ("re:" in t, t))
    for t in ordered:
        if rules.entry_matches(t, name, "") in ("name", "regex"):
            return owner[t]
    return owner[cls] if cls in owner else None


def _check_modules(
    ck: Checkpoint,
    config: Mapping[str, Any],
    modules: Mapping[str, kinds.Module],
    groups: list[_Group],
    ignore: list[str],
    result: Contract,
) -> None:
    tensors = ck.tensors
    tied = kinds.tied_embeddings(config)
    linear = [m for m in modules.values() if m.kind == kinds.LINEAR and m.weight]
    heads = [m.name for m in linear if m.role == "lm_head"]
    head = heads[0] if heads else None
    has_embedding = any(m.kind == kinds.EMBEDDING for m in modules.values())
    # A tied lm_head has no tensors on disk but is an nn.Linear in every loader.
    virtual_head = head is None and tied and has_embedding
    head_name = head or ("lm_head" if virtual_head else None)

    selected: dict[str, _Group | None] = {}
    for m in linear:
        g = _match(groups, ignore, m.name, kinds.LINEAR)
        selected[m.name] = g
        on_disk = _state(m.name, tensors)
        if g is None:
            if on_disk != "dense":
                why = "is in ignore" if _is_ignored(groups, ignore, m.name) else "is not targeted"
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
        if m.role == "expert" and g.layout == "I8" and g.format == "int-quantized":
            result.add(
                "tensors.expert",
                m.name,
                "an MoE expert stored int-quantized (int8 W8A8)",
                "vLLM's FusedMoE loads it, but transformers 5.24 fails to load int8 experts",
                WARNING,
            )
        qm = _check_quantized_module(m, g, tensors, result)
        if qm is not None:
            result.modules.append(qm)

    for m in modules.values():
        if m.kind == kinds.LINEAR and m.weight:
            continue
        stray = [t for t in m.tensors if _is_quant_tensor(t, tensors[t])]
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

    names = [m.name for m in linear] + ([head_name] if virtual_head and head_name else [])
    for g in groups:
        for t in g.targets:
            if not any(
                rules.entry_matches(t, n, kinds.LINEAR)
                or rules.entry_matches(t, n, _VLLM_HEAD_CLASS)
                for n in names
            ):
                result.add(
                    "config.targets",
                    f"{g.name}.targets",
                    f"{t!r} matches no Linear module",
                    "loaders quantize nothing with it (compressed-tensors warns)",
                    WARNING,
                )
    result.lm_head = _check_lm_head(
        head_name, virtual_head, tied, tensors, groups, ignore, selected, result
    )
    if virtual_head and result.lm_head and not result.lm_head.transformers:
        result.dense_linear.append(head_name)
    _check_fused(selected, result)
    if not any(g is not None for g in selected.values()):
        result.add(
            "config.targets",
            "quantization_config",
            "no Linear module is quantized (every target is ignored or matches nothing)",
            "the checkpoint runs dense; the quantization config only costs load time",
            WARNING,
        )


def _subject(module: str, tensors: Mapping[str, TensorInfo]) -> str:
    for leaf in ("weight", "weight_packed", "weight_scale"):
        if f"{module}.{leaf}" in tensors:
            return f"{module}.{leaf}"
    return module


def _is_ignored(groups: Sequence[_Group], ignore: Sequence[str], name: str) -> bool:
    targeted = any(rules.first_match(g.targets, name, kinds.LINEAR) for g in groups)
    return targeted and bool(rules.first_match(ignore, name, kinds.LINEAR))


def _state(module: str, tensors: Mapping[str, TensorInfo]) -> str:
    """ "quantized", "dense" or "absent", from the module's tensors on disk."""
    w = tensors.get(f"{module}.weight")
    if any(f"{module}.{p}" in tensors for p in Q_PARAMS) or (
        w is not None and w.dtype not in FLOAT_DTYPES
    ):
        return "quantized"
    return "dense" if w is not None else "absent"


def _check_quantized_module(
    m: kinds.Module, g: _Group, tensors: Mapping[str, TensorInfo], result: Contract
) -> QuantModule | None:
    """The tensors of module `m`, quantized by group `g`, against g's format."""
    name = m.name
    if g.layout is None:
        result.add(
            "tensors.layout",
            name,
            f"quantized by {g.name}, whose scheme qcli verify cannot check",
            "its tensors are not checked",
            WARNING,
        )
        return None
    fmt = g.format
    ok = True
    w = tensors.get(f"{name}.weight")
    packed = tensors.get(f"{name}.weight_packed")
    shape: tuple[int, int] | None = None
    if g.layout == "packed":
        if packed is None:
            have = f"{name}.weight ({w.dtype})" if w else "no weight tensor"
            result.add(
                "tensors.layout",
                f"{name}.weight_packed",
                f"missing ({have}) although format is 'pack-quantized'",
                "compressed-tensors finds no packed weight: the model fails to load or"
                " computes garbage",
            )
            return None
        shape = _check_packed(name, packed, tensors.get(f"{name}.weight_shape"), result)
        weight = packed
        ok = shape is not None
        if w is not None:
            result.add(
                "tensors.layout",
                f"{name}.weight",
                "present next to weight_packed",
                "loaders report an unexpected key, or load the wrong tensor",
            )
            ok = False
    else:
        if w is None:
            result.add(
                "tensors.layout",
                f"{name}.weight",
                f"missing{' (found weight_packed)' if packed else ''} although format is {fmt!r}",
                "the model fails to load",
            )
            return None
        weight = w
        if w.dtype != g.layout:
            result.add(
                "tensors.dtype",
                f"{name}.weight",
                f"is {w.dtype}, but format {fmt!r} with {g.weight_type} weights stores {g.layout}",
                "compressed-tensors decompresses the bytes as the wrong type (garbage) or"
                " fails to load",
            )
            ok = False
        if len(w.shape) != 2:
            result.add(
                "tensors.shape",
                f"{name}.weight",
                f"has shape {list(w.shape)}, not [out, in]",
                "the model fails to load",
            )
            return None
        shape = (w.shape[0], w.shape[1])
        for extra in ("weight_packed", "weight_shape"):
            if f"{name}.{extra}" in tensors:
                result.add(
                    "tensors.layout",
                    f"{name}.{extra}",
                    f"present although format is {fmt!r}",
                    "loaders report an unexpected key",
                    WARNING,
                )
    scale = tensors.get(f"{name}.weight_scale")
    if scale is None:
        result.add("tensors.scale", f"{name}.weight_scale", "missing", NAN_LOGITS)
        return None
    if shape is not None and not _check_scale(name, scale, shape[0], result):
        ok = False
    for extra, why in (("weight_zero_point", "symmetric"), ("input_scale", "dynamic")):
        if f"{name}.{extra}" in tensors:
            result.add(
                "tensors.layout",
                f"{name}.{extra}",
                f"present, but the scheme is {why}",
                "loaders report an unexpected key (vLLM may refuse it)",
                WARNING,
            )
    if not ok or shape is None or g.scheme is None:
        return None
    return QuantModule(name, m.role, g.name, g.scheme, weight, scale, shape)


def _check_packed(
    name: str, packed: TensorInfo, shape_t: TensorInfo | None, result: Contract
) -> tuple[int, int] | None:
    if packed.dtype != "I32" or len(packed.shape) != 2:
        result.add(
            "tensors.dtype",
            f"{name}.weight_packed",
            f"is {packed.dtype}{list(packed.shape)}, not int32 [out, in/4]",
            "compressed-tensors unpacks garbage or fails to load",
        )
        return None
    if shape_t is None:
        result.add(
            "tensors.layout",
            f"{name}.weight_shape",
            "missing",
            "compressed-tensors cannot unpack the weight: the model fails to load",
        )
        return None
    if shape_t.dtype not in ("I64", "I32") or shape_t.shape != (2,):
        result.add(
            "tensors.dtype",
            f"{name}.weight_shape",
            f"is {shape_t.dtype}{list(shape_t.shape)}, not int64 [2]",
            "compressed-tensors cannot unpack the weight",
        )
        return None
    fmt = "<2q" if shape_t.dtype == "I64" else "<2i"
    out_f, in_f = struct.unpack(fmt, read_raw(shape_t))
    rows, words = packed.shape
    if out_f != rows or in_f <= 0 or -(-in_f // 4) != words:
        result.add(
            "tensors.shape",
            f"{name}.weight_shape",
            f"says [{out_f}, {in_f}] but weight_packed is [{rows}, {words}]",
            "compressed-tensors unpacks the weight into the wrong shape or fails",
        )
        return None
    if in_f % 4:
        result.add(
            "tensors.shape",
            f"{name}.weight_shape",
            f"in_features {in_f} is not a multiple of 4",
            "vLLM's packed int8 kernels refuse the layer",
        )
        return None
    return out_f, in_f


def _check_scale(name: str, scale: TensorInfo, out_f: int, result: Contract) -> bool:
    subject = f"{name}.weight_scale"
    if scale.dtype not in SCALE_DTYPES:
        result.add(
            "tensors.scale",
            subject,
            f"is {scale.dtype}, not float32/bfloat16/float16",
            "loaders multiply by garbage or fail to load",
        )
        return False
    if scale.shape != (out_f, 1):
        problem = f"has shape {list(scale.shape)}, expected [{out_f}, 1]"
        if scale.shape == (out_f,):
            consequence = "a 1-D scale fails to load in transformers and vLLM"
        else:
            consequence = "the model fails to load, or scales the wrong rows"
        result.add("tensors.scale", subject, problem, consequence)
        return False
    bad = first_bad_scale(scale)
    if bad is not None:
        row, value = bad
        result.add(
            "tensors.scale_value",
            subject,
            f"row {row} is {value} (scales must be finite and > 0)",
            "that output channel comes out NaN, infinite, zero or sign-flipped in every loader",
        )
        return False
    return True


def _check_lm_head(
    name: str | None,
    virtual: bool,
    tied: bool,
    tensors: Mapping[str, TensorInfo],
    groups: list[_Group],
    ignore: list[str],
    selected: Mapping[str, _Group | None],
    result: Contract,
) -> LmHead | None:
    """The vLLM rule (quantized ⇔ named in targets) and tied-embedding consistency."""
    named = [
        t
        for g in groups
        for t in g.targets
        if t == "lm_head" or (name and rules.entry_matches(t, name, _VLLM_HEAD_CLASS))
    ]
    if name is None:
        if named:
            result.add(
                "lm_head.targets",
                "quantization_config targets",
                f"{named[0]!r} names lm_head, but the checkpoint has none",
                "vLLM looks for an lm_head scale that does not exist",
                WARNING,
            )
        return None
    on_disk = _state(name, tensors)
    group = _match(groups, ignore, name, kinds.LINEAR) if virtual else selected.get(name)
    in_ct = group is not None
    vllm_group = _match(groups, ignore, name, _VLLM_HEAD_CLASS)
    in_vllm = vllm_group is not None
    head = LmHead(name, on_disk, tied, in_ct, in_vllm)
    if virtual:
        if in_ct or in_vllm:
            result.add(
                "lm_head.tied",
                name,
                "tied to the embedding (no lm_head tensors) but quantized by the config"
                f" ({'named in targets' if in_vllm else 'class Linear matches it'}, not in"
                " ignore)",
                "transformers finds no lm_head scale (NaN logits); vLLM ties lm_head to the"
                " dense embedding and drops the scheme's scale",
            )
        return head
    if tied and on_disk != "absent":
        result.add(
            "lm_head.tied",
            f"{name}.weight",
            "stored, but tie_word_embeddings is true",
            "vLLM ties lm_head to the embedding table and drops lm_head's tensors and scale"
            if on_disk == "quantized"
            else "loaders tie lm_head to the embedding and ignore this tensor",
            ERROR if on_disk == "quantized" else WARNING,
        )
    if on_disk == "quantized" and not in_vllm:
        result.add(
            "lm_head.targets",
            _subject(name, tensors),
            "stored quantized, but lm_head is not named in targets"
            + (" (only class 'Linear' matches it)" if in_ct else ""),
            "vLLM will run lm_head dense (class Linear does not match its ParallelLMHead) and"
            " fails on, or misreads, the int8/fp8 tensors",
        )
    elif on_disk == "quantized" and vllm_group.scheme and not vllm_group.scheme.vllm_lm_head_ok:
        result.add(
            "lm_head.scheme",
            _subject(name, tensors),
            f"quantized as {vllm_group.scheme.name} (fp8 weight-only)",
            "current vLLM crashes loading an fp8 weight-only lm_head (use FP8_DYNAMIC);"
            " transformers loads it",
            # A valid compressed-tensors checkpoint that one loader cannot serve: worth saying
            # loudly, not a broken checkpoint (quantize warns about it too).
            WARNING,
        )
    elif on_disk == "dense" and in_vllm and not in_ct:
        result.add(
            "lm_head.targets",
            f"{name}.weight",
            "stored dense, but named in targets and not in ignore",
            "vLLM builds a quantized lm_head and finds no scale: it fails to load",
        )
    return head


def _check_fused(selected: Mapping[str, _Group | None], result: Contract) -> None:
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


# --- raw values -----------------------------------------------------------------------------

# Bit pattern of +inf per dtype: a float is finite and > 0 exactly when its bits, read as an
# unsigned integer, lie strictly between 0 (+0.0) and +inf's (negatives have the sign bit set,
# NaNs lie above +inf). That lets the check run on array min/max at C speed, no torch needed.
_INF_BITS = {"F32": ("I", 0x7F800000), "BF16": ("H", 0x7F80), "F16": ("H", 0x7C00)}


def read_raw(info: TensorInfo) -> bytes:
    """A tensor's bytes as stored (little-endian)."""
    fd = os.open(info.file, os.O_RDONLY)
    try:
        data = os.pread(fd, info.nbytes, info.start)
    finally:
        os.close(fd)
    if len(data) != info.nbytes:
        raise CheckpointError(f"{info.file.name}: tensor {info.name!r} is truncated")
    return data


def decode_floats(info: TensorInfo, data: bytes | None = None) -> list[float]:
    """The values of a float32 / bfloat16 / float16 tensor, as Python floats."""
    data = read_raw(info) if data is None else data
    n = len(data) // {"F32": 4, "BF16": 2, "F16": 2}[info.dtype]
    if info.dtype == "F32":
        return list(struct.unpack(f"<{n}f", data))
    if info.dtype == "F16":
        return list(struct.unpack(f"<{n}e", data))
    halves = struct.unpack(f"<{n}H", data)  # bf16 is the top half of a float32
    return list(struct.unpack(f"<{n}f", struct.pack(f"<{n}I", *(h << 16 for h in halves))))


def first_bad_scale(info: TensorInfo) -> tuple[int, float] | None:
    """(index, value) of the first entry that is not finite and > 0, or None."""
    code, inf_bits = _INF_BITS[info.dtype]
    data = read_raw(info)
    bits = array.array(code, data)
    if sys.byteorder == "big":
        bits.byteswap()
    if not bits or (min(bits) > 0 and max(bits) < inf_bits):
        return None
    i = next(i for i, b in enumerate(bits) if not 0 < b < inf_bits)
    size = bits.itemsize
    return i, decode_floats(info, data[i * size : (i + 1) * size])[0]


def sorted_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Errors first, then by subject in natural order (layers.10 after layers.9)."""
    return sorted(findings, key=lambda f: (f.severity != ERROR, natural_key(f.subject)))


__all__ = [
    "Contract",
    "ERROR",
    "Finding",
    "LmHead",
    "QuantModule",
    "WARNING",
    "check",
    "check_folder",
    "decode_floats",
    "first_bad_scale",
    "is_quantized",
    "read_raw",
    "sorted_findings",
]
