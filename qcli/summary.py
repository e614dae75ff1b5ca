"""What a checkpoint holds, from its headers and config alone: no torch, no tensor data.

`qcli inspect` and `qcli quantize --dry-run` read a checkpoint through here. For a dense
checkpoint the summary comes with the plan a quantize run would execute (qcli.planner, the same
decisions); for a quantized one, with what its quantization_config and tensors say it is, and
the contract findings that `verify` reports without running any numbers (qcli.contract).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcli import checks, dequant, experts, heads, kinds, layout
from qcli.checks import Contract
from qcli.errors import QcliError
from qcli.rules import Matcher
from qcli.schemes import scheme_from_group
from qcli.source import Opened
from qcli.tensors import DTYPES, Checkpoint, TensorInfo, natural_key

# config.json's torch dtype names -> safetensors dtype names
_CONFIG_DTYPES = {torch_name: st for st, (_, torch_name) in DTYPES.items()}


# --- the summary -----------------------------------------------------------------------


@dataclass
class TensorRow:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    module: str
    kind: str  # kinds.classify's kind, or "?" when the architecture is not understood
    role: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "bytes": self.nbytes,
            "file": self.file,
            "module": self.module,
            "kind": self.kind,
            "role": self.role,
        }


@dataclass
class QuantGroup:
    name: str
    scheme: str  # a qcli preset name, or "custom"
    format: str | None
    targets: list[str]
    weights: dict[str, Any] | None
    input_activations: dict[str, Any] | None
    modules: list[str] = field(default_factory=list)


FUSED_EXPERTS = "experts (fused)"  # a tensor of every expert of a layer: split when written


@dataclass
class Quantization:
    """What a quantized checkpoint says about itself (config) and shows (tensors)."""

    method: str | None
    format: str | None
    status: str | None
    groups: list[QuantGroup]
    ignore: list[str]
    quantized: list[str]  # modules stored quantized (they have a weight_scale)
    dense_linear: list[str]  # Linear modules stored dense
    unmatched: list[str]  # quantized modules that no group's targets select
    lm_head: str  # "quantized", "dense", "tied (dense)", "absent"
    dense_dtype: str | None  # the dtype the model computes in (config), for the ratio
    dense_bytes: int  # estimated size of the same checkpoint unquantized
    contract: Contract | None  # verify's header checks (qcli.contract); None when not run
    contract_error: str | None = None  # why they could not run
    stored_as: str | None = None  # a release qcli re-quantizes from: how its weights are stored

    @property
    def requantizable(self) -> bool:
        """A quantized release (not compressed-tensors) that `quantize` decodes and quantizes."""
        return self.stored_as is not None

    def ratio(self, stored: int) -> float:
        return self.dense_bytes / stored if stored else 0.0

    def to_json(self, stored: int) -> dict[str, Any]:
        """The quantization as data; `stored`: the checkpoint's bytes."""
        q = self

        return {
            "quant_method": q.method,
            "format": q.format,
            "quantization_status": q.status,
            "groups": [
                {
                    "name": g.name,
                    "scheme": g.scheme,
                    "format": g.format,
                    "targets": g.targets,
                    "weights": g.weights,
                    "input_activations": g.input_activations,
                    "modules": len(g.modules),
                }
                for g in q.groups
            ],
            "ignore": q.ignore,
            "quantized_modules": q.quantized,
            "dense_linear_modules": q.dense_linear,
            "unmatched_modules": q.unmatched,
            "lm_head": q.lm_head,
            "dense_dtype": q.dense_dtype,
            "dense_bytes_estimate": q.dense_bytes,
            "compression_ratio": round(q.ratio(stored), 3),
            "contract": q.contract.to_json() if q.contract else None,
            "contract_error": q.contract_error,
            "stored_as": q.stored_as,
        }


@dataclass
class Summary:
    label: str
    source: dict[str, Any]
    checkpoint: Checkpoint
    architectures: list[str]
    model_type: str | None
    tensors: list[TensorRow]
    modules: dict[str, kinds.Module]
    tied_embeddings: bool
    kinds_error: str | None
    quantization: Quantization | None
    warnings: list[str]
    # the tensors as modules see them (fused experts per expert: qcli.experts.view)
    logical: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.quantization is not None

    @property
    def bytes(self) -> int:
        return self.checkpoint.total_bytes

    def parameters(self) -> dict[str, int]:
        """Parameters per stored dtype; a packed int32 word holds four 8-bit weights, and
        scales and shapes describe storage, not the model."""
        out: Counter[str] = Counter()
        for t in self.tensors:
            if _is_scale(t.name):
                continue
            n = layout.dense_numel(t.name, t.shape)
            packed = t.name.rpartition(".")[2] == layout.PACKED
            out["I8 (packed in I32)" if packed else t.dtype] += n
        return dict(out)

    def files(self) -> list[dict[str, Any]]:
        per: dict[str, list[TensorInfo]] = {}
        for t in self.checkpoint.tensors.values():
            per.setdefault(t.file.name, []).append(t)
        return [
            {
                "name": f.name,
                "bytes": _file_size(f, per.get(f.name, [])),
                "tensors": len(per.get(f.name, [])),
            }
            for f in self.checkpoint.files
        ]

    def kind_counts(self) -> dict[str, int]:
        return dict(Counter(_kind_label(m.kind, m.role) for m in self.modules.values() if m.weight))

    def to_json(self) -> dict[str, Any]:
        """The summary as data: every tensor and every module, lm_head and embeddings included."""
        s = self
        ck = s.checkpoint
        body: dict[str, Any] = {
            "source": s.source,
            "architectures": s.architectures,
            "model_type": s.model_type,
            "quantized": s.quantized,
            "parameters": sum(s.parameters().values()),
            "parameters_by_dtype": s.parameters(),
            "dtypes": sorted({t.dtype for t in s.tensors}),
            "bytes": s.bytes,
            "sharded": ck.sharded,
            "files": s.files(),
            "tied_embeddings": s.tied_embeddings,
            "kinds": s.kind_counts(),
            "kinds_error": s.kinds_error,
            "warnings": s.warnings,
            "modules": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "role": m.role,
                    "weight": m.weight,
                    "shape": list(s.logical[m.weight].shape) if m.weight else None,
                    "dtype": s.logical[m.weight].dtype if m.weight else None,
                    "tensors": list(m.tensors),
                }
                for m in sorted(s.modules.values(), key=lambda m: natural_key(m.name))
            ],
            "tensors": [t.to_json() for t in s.tensors],
        }
        if s.quantization is not None:
            body["quantization"] = s.quantization.to_json(s.bytes)
        return body


def summarize(opened: Opened, contract: bool = True) -> Summary:
    """Everything the headers and config.json say; never raises for a model it cannot plan."""
    ck = opened.checkpoint
    config = ck.config or {}
    # Kinds come from names and shapes; another tool's quantization_config (which classify
    # refuses, as a quantize source) must not hide them from a summary.
    dense_config = {k: v for k, v in config.items() if k != "quantization_config"}
    logical, pieces = experts.view(ck.tensors, dense_config)
    shapes = {n: (t.dtype, t.shape) for n, t in logical.items()}
    modules: dict[str, kinds.Module] = {}
    kinds_error = None
    try:
        modules = kinds.classify(shapes, dense_config)
    except kinds.UnsupportedArchitecture as e:
        kinds_error = str(e)
    owner = {t: m for m in modules.values() for t in m.tensors}
    fused = experts.sources(pieces)
    rows = []
    for name, t in ck.tensors.items():
        m = owner.get(name)
        rows.append(
            TensorRow(
                name,
                t.dtype,
                t.shape,
                t.nbytes,
                t.file.name,
                m.name if m else name.rpartition(".")[0],
                m.kind if m else (FUSED_EXPERTS if name in fused else "?"),
                m.role if m else None,
            )
        )
    archs = config.get("architectures") or []
    summary = Summary(
        opened.label,
        opened.source,
        ck,
        [str(a) for a in archs] if isinstance(archs, list) else [str(archs)],
        config.get("model_type"),
        rows,
        modules,
        heads.tied_embeddings(config),
        kinds_error,
        None,
        list(ck.warnings),
        logical,
    )
    if is_quantized(ck):
        summary.quantization = _quantization(summary, contract)
    return summary


def is_quantized(ck: Checkpoint) -> bool:
    """Claims quantization in config.json, or holds quantized tensors (the checks' test)."""
    return checks.is_quantized(ck)


def _quantization(s: Summary, contract: bool) -> Quantization:
    ck = s.checkpoint
    config = ck.config or {}
    qc = config.get("quantization_config")
    qc = qc if isinstance(qc, dict) else {}
    ignore = [str(i) for i in qc.get("ignore") or []]
    groups = _groups(qc)

    scaled, stored_as = _scaled_modules(ck)
    # A module with a weight_scale is stored quantized, whatever kind the names suggest.
    quantized = sorted(scaled, key=natural_key)
    linear = [m for m in s.modules.values() if m.kind in (kinds.LINEAR, kinds.CONV1D)]
    dense_linear = sorted((m.name for m in linear if m.name not in scaled), key=natural_key)
    by_name = {g.name: g for g in groups}
    matcher = Matcher({g.name: g.targets for g in groups}, ignore)
    unmatched = []
    for name in quantized if stored_as is None else ():  # a release has no groups
        m = s.modules.get(name)
        hit = matcher.match(name, m.kind if m else kinds.LINEAR)
        if hit is None or hit.group is None:
            unmatched.append(name)
        else:
            by_name[hit.group].modules.append(name)

    lm_head = _head_state(s, config, scaled)
    dense_dtype = _config_dtype(config) or _scale_dtype(ck)
    dense_bytes = _dense_bytes(ck, scaled, dense_dtype)

    found, contract_error = _contract(ck) if contract else (None, None)
    if stored_as is not None:
        found, contract_error = (
            None,
            (
                "not run: not a compressed-tensors checkpoint (quantize re-quantizes it from its"
                " decoded weights; verify checks the output)"
            ),
        )
    return Quantization(
        qc.get("quant_method"),
        qc.get("format"),
        qc.get("quantization_status"),
        groups,
        ignore,
        quantized,
        dense_linear,
        unmatched,
        lm_head,
        dense_dtype,
        dense_bytes,
        found,
        contract_error,
        stored_as,
    )


def _scaled_modules(ck: Checkpoint) -> tuple[set[str], str | None]:
    """The modules stored quantized, and for a block-FP8 release (which quantize decodes)
    what its weights are stored as."""
    scale = f".{layout.SCALE}"
    if not dequant.is_release(ck):
        return {n.removesuffix(scale) for n in ck.tensors if n.endswith(scale)}, None
    try:
        stored = dequant.find(ck)
    except QcliError:
        stored = {}
    blocks = sorted({"x".join(map(str, st.block)) for st in stored.values()})
    stored_as = f"fp8 e4m3 with {', '.join(blocks)} block scales" if stored else None
    return {n.removesuffix(".weight") for n in stored}, stored_as


def _head_state(s: Summary, config: dict[str, Any], scaled: set[str]) -> str:
    head = heads.resolve(s.modules, config, {n: (t.dtype, t.shape) for n, t in s.logical.items()})
    if head.on_disk:
        return "quantized" if head.name in scaled else "dense"
    return "tied (dense)" if head.virtual else "absent"


def _groups(qc: dict[str, Any]) -> list[QuantGroup]:
    groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        if not isinstance(g, dict):
            continue
        preset = scheme_from_group({**g, "format": g.get("format") or qc.get("format")})
        groups.append(
            QuantGroup(
                str(gname),
                preset.name if preset else "custom",
                g.get("format") or qc.get("format"),
                [str(t) for t in g.get("targets") or []],
                g.get("weights"),
                g.get("input_activations"),
            )
        )
    return groups


def _dense_bytes(ck: Checkpoint, scaled: set[str], dense_dtype: str | None) -> int:
    """The checkpoint's size with every quantized weight stored in `dense_dtype` again."""
    total = 0
    for name, t in ck.tensors.items():
        module, _, leaf = name.rpartition(".")
        if _is_scale(name):
            continue
        if module in scaled and leaf in (layout.WEIGHT, layout.PACKED) and dense_dtype:
            total += layout.dense_numel(name, t.shape) * DTYPES[dense_dtype][0]
        else:
            total += t.nbytes
    return total


def _is_scale(name: str) -> bool:
    """A tensor that describes storage (scales, shapes), not the model: no parameter."""
    return layout.is_aux(name) or name.rpartition(".")[2] in dequant.SCALE_NAMES


def _contract(ck: Checkpoint) -> tuple[Contract | None, str | None]:
    """verify's contract checks: config against tensors, plus the scales' raw values."""
    if not all(f.is_file() for f in ck.files):
        # A hub repo read through its headers: the scale values the checks read are remote.
        return None, (
            "not run: the weights are not downloaded (headers only); run `qcli verify` on a"
            " downloaded copy"
        )
    try:
        return checks.check(ck), None
    except QcliError as e:
        return None, str(e)


def _config_dtype(config: dict[str, Any]) -> str | None:
    for c in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            value = c.get(key) if isinstance(c, dict) else None
            if isinstance(value, str):
                st = _CONFIG_DTYPES.get(value.removeprefix("torch."))
                if st:
                    return st
    return None


def _scale_dtype(ck: Checkpoint) -> str | None:
    for n, t in ck.tensors.items():
        if n.endswith(f".{layout.SCALE}") and t.dtype in layout.SCALE_DTYPES:
            return t.dtype
    return None


def _file_size(path: Path, tensors: list[TensorInfo]) -> int:
    """A shard's size: on disk when local; for a remote shard, where its last tensor ends."""
    try:
        return path.stat().st_size
    except OSError:
        return max((t.end for t in tensors), default=0)


# Roles worth a word next to the kind: they change what quantize does by default.
_SHOWN_ROLES = ("lm_head", "router", "vision", "audio", "expert", "classifier")


def _kind_label(kind: str, role: str | None) -> str:
    return f"{kind} ({role})" if role in _SHOWN_ROLES else kind


def kind_label(row: TensorRow) -> str:
    """e.g. "Linear", "Linear (lm_head)", "Embedding", "Norm"."""
    return _kind_label(row.kind, row.role)
