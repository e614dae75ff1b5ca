"""The four presets and the compressed-tensors config they write (see shared/format.md).

No torch here: `inspect` and `--dry-run` use the presets from headers alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qcli.errors import InputError
from qcli.layout import Layout
from qcli.layout import of as layout_of


@dataclass(frozen=True)
class Scheme:
    """One preset: how weights are stored and how the loader runs activations."""

    name: str
    weight_type: str  # "int" or "float" (compressed-tensors' QuantizationType)
    format: str  # compressed-tensors CompressionFormat value
    dynamic_activations: bool  # per-token dynamic activations (W8A8 / FP8_DYNAMIC)
    description: str

    @property
    def qtype(self) -> str:
        """The weight quantizer in qcli.quant: "int8" or "fp8"."""
        return "int8" if self.weight_type == "int" else "fp8"

    @property
    def layout(self) -> Layout:
        """How its weights are stored (qcli.layout)."""
        found = layout_of(self.format, self.weight_type)
        assert found is not None, self.name
        return found

    @property
    def vllm_lm_head_ok(self) -> bool:
        """Current vLLM crashes on an fp8 weight-only lm_head (format.md)."""
        return self.name != "FP8"

    def args(self, strategy: str) -> dict[str, Any]:
        # Only long-standing keys: compressed-tensors rejects unknown ones.
        return {
            "num_bits": 8,
            "type": self.weight_type,
            "symmetric": True,
            "strategy": strategy,
            "dynamic": strategy == "token",
            "group_size": None,
        }

    def config_group(self, targets: list[str]) -> dict[str, Any]:
        return {
            "targets": list(targets),
            "weights": self.args("channel"),
            "input_activations": self.args("token") if self.dynamic_activations else None,
            "output_activations": None,
            "format": self.format,
        }


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("W8A8", "int", "int-quantized", True, "int8 weights, dynamic int8 activations"),
        Scheme("W8A16", "int", "pack-quantized", False, "int8 weights only, packed in int32"),
        Scheme("FP8_DYNAMIC", "float", "float-quantized", True, "fp8 weights and activations"),
        Scheme("FP8", "float", "naive-quantized", False, "fp8 weights only"),
    )
}


def get_scheme(name: str) -> Scheme:
    key = name.upper().replace("-", "_")
    if key not in SCHEMES:
        raise InputError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[key]


def scheme_from_group(group: dict[str, Any]) -> Scheme | None:
    """Which preset a written config group is, or None when it is none of them."""
    w = group.get("weights") or {}
    for s in SCHEMES.values():
        if (
            group.get("format") == s.format
            and w.get("type") == s.weight_type
            and w.get("num_bits") == 8
            and w.get("strategy") == "channel"
            and bool(group.get("input_activations")) == s.dynamic_activations
        ):
            return s
    return None


def quantization_config(scheme: Scheme, targets: list[str], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json, one group, format at both levels."""
    return {
        "quant_method": "compressed-tensors",
        "format": scheme.format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme.config_group(targets)},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }
