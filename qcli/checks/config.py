"""The quantization_config itself: keys compressed-tensors accepts, formats, schemes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qcli import layout, rules
from qcli.checks.findings import READ_AS_FLOAT, WARNING, Contract
from qcli.errors import InputError
from qcli.layout import Layout
from qcli.schemes import Scheme, scheme_from_group

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


@dataclass(frozen=True)
class Group:
    """One config group, as far as the checks could read it."""

    name: str
    targets: tuple[str, ...]
    format: str | None
    weight_type: str | None  # "int" / "float"
    layout: Layout | None  # how its weights must be stored; None: qcli cannot check them
    scheme: Scheme | None  # the qcli preset it is, if any
    signature: str  # what must be equal across a fused layer's parts


def check_config(qc: dict[str, Any], result: Contract) -> list[Group]:
    """The quantization_config's own rules (keys, formats, schemes); returns its groups."""
    _check_method_and_status(qc, result)
    top = _check_top_format(qc, result)
    _check_ignore(qc, result)
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


def _check_method_and_status(qc: dict[str, Any], result: Contract) -> None:
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


def _check_top_format(qc: dict[str, Any], result: Contract) -> Any:
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
    return top


def _check_ignore(qc: dict[str, Any], result: Contract) -> None:
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


def valid_entries(entries: Any) -> list[str]:
    """The entries that can be matched at all (a broken regex is reported on its own)."""
    out = []
    for e in entries if isinstance(entries, list) else []:
        try:
            rules.validate([e])
        except (InputError, TypeError, AttributeError):
            continue
        out.append(e)
    return out


def _check_group(name: str, body: Any, result: Contract) -> Group | None:
    subject = f"config_groups.{name}"
    if not isinstance(body, dict):
        result.add(
            "config.group",
            subject,
            "is not an object (qcli verify reads explicit scheme groups)",
            "cannot tell how its modules are stored",
        )
        return None
    targets = _check_group_keys(subject, body, result)
    weights = body.get("weights")
    acts = body.get("input_activations")
    fmt = _check_group_format(subject, body.get("format"), result)
    wtype = weights.get("type") if isinstance(weights, dict) else None
    fmt_layout = _check_scheme(subject, fmt, weights, acts, result)
    scheme = scheme_from_group(body) if fmt_layout else None
    if fmt_layout and scheme is None:
        result.add(
            "config.scheme",
            subject,
            f"format {fmt!r} with {_describe_args(weights)} weights is none of qcli's presets",
            "verify checks its tensors but runs no numeric check for it",
            WARNING,
        )
    signature = repr((fmt, _norm_args(weights), _norm_args(acts)))
    return Group(name, tuple(valid_entries(targets)), fmt, wtype, fmt_layout, scheme, signature)


def _check_group_keys(subject: str, body: dict[str, Any], result: Contract) -> list[str]:
    """Unknown keys, targets, and the args' own keys; returns the group's targets."""
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
    for key in ("weights", "input_activations"):
        if body.get(key) is not None:
            _check_args(f"{subject}.{key}", body[key], result)
    if body.get("output_activations"):
        result.add(
            "config.scheme",
            f"{subject}.output_activations",
            "set; qcli's schemes quantize no outputs",
            "verify cannot reproduce what the loader computes",
        )
    return targets


def _check_group_format(subject: str, fmt: Any, result: Contract) -> str | None:
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
        return None
    return fmt


def _check_scheme(
    subject: str, fmt: str | None, weights: Any, acts: Any, result: Contract
) -> Layout | None:
    """Whether the format can store these weights, and the args are a scheme qcli checks:
    the layout the group's tensors must have, or None when they cannot be checked."""
    wtype = weights.get("type") if isinstance(weights, dict) else None
    fmt_layout = _layout(fmt, wtype, weights)
    if weights is not None and fmt_layout is None and fmt is not None:
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
        fmt_layout = None
    if acts is not None and not _per_token_dynamic(acts, wtype):
        result.add(
            "config.scheme",
            f"{subject}.input_activations",
            f"{_describe_args(acts)}: qcli verify checks 8-bit symmetric per-token dynamic"
            " activations of the weights' type only",
            "the numeric checks cannot run for this group",
        )
        fmt_layout = None
    if wtype == "int" and not acts and fmt_layout and fmt != "pack-quantized":
        result.add(
            "config.format",
            f"{subject}.format",
            f"int8 weight-only written as {fmt!r}",
            "vLLM cannot pick a kernel for it (int8 weight-only loads as 'pack-quantized')",
        )
    return fmt_layout


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


def _layout(fmt: Any, wtype: Any, weights: Any) -> Layout | None:
    if not isinstance(weights, dict) or weights.get("num_bits") != 8:
        return None
    fmt = fmt if isinstance(fmt, str) else None
    return layout.of(fmt, wtype if isinstance(wtype, str) else None)


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
