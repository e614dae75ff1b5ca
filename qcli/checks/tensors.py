"""One quantized module's tensors against the layout its group's format prescribes.

Names, dtypes, shapes and packing come from qcli.layout (what the writer writes); the scale
values and the packed shape are read raw (qcli.checks.raw), so no torch is needed.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from qcli import kinds
from qcli.checks.config import Group
from qcli.checks.findings import NAN_LOGITS, WARNING, Contract, QuantModule
from qcli.checks.raw import first_bad_scale, read_raw
from qcli.layout import (
    INPUT_SCALE,
    INT32,
    PACKED,
    SCALE,
    SCALE_DTYPES,
    SHAPE,
    WEIGHT,
    ZERO_POINT,
)
from qcli.tensors import TensorInfo


def check_quantized_module(
    m: kinds.Module, g: Group, tensors: Mapping[str, TensorInfo], result: Contract
) -> QuantModule | None:
    """The tensors of module `m`, quantized by group `g`, against g's layout (qcli.layout):
    the QuantModule the numeric checks run when they hold."""
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
    check = _check_packed_weight if g.layout.packed else _check_plain_weight
    found = check(name, g, tensors, result)
    if found is None:
        return None
    weight, shape, ok = found
    scale = tensors.get(f"{name}.{SCALE}")
    if scale is None:
        result.add("tensors.scale", f"{name}.{SCALE}", "missing", NAN_LOGITS)
        return None
    if shape is not None and not _check_scale(name, scale, shape[0], result):
        ok = False
    for extra, why in ((ZERO_POINT, "symmetric"), (INPUT_SCALE, "dynamic")):
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


def _check_packed_weight(
    name: str, g: Group, tensors: Mapping[str, TensorInfo], result: Contract
) -> tuple[TensorInfo, tuple[int, int] | None, bool] | None:
    """pack-quantized: weight_packed and weight_shape, and no plain weight beside them."""
    w = tensors.get(f"{name}.{WEIGHT}")
    packed = tensors.get(f"{name}.{PACKED}")
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
    shape = _check_packed(name, packed, tensors.get(f"{name}.{SHAPE}"), result)
    ok = shape is not None
    if w is not None:
        result.add(
            "tensors.layout",
            f"{name}.weight",
            "present next to weight_packed",
            "loaders report an unexpected key, or load the wrong tensor",
        )
        ok = False
    return packed, shape, ok


def _check_plain_weight(
    name: str, g: Group, tensors: Mapping[str, TensorInfo], result: Contract
) -> tuple[TensorInfo, tuple[int, int] | None, bool] | None:
    """int-, float- and naive-quantized: a 2-D `weight` of the format's dtype."""
    assert g.layout is not None
    fmt = g.format
    w = tensors.get(f"{name}.{WEIGHT}")
    if w is None:
        packed = f"{name}.{PACKED}" in tensors
        result.add(
            "tensors.layout",
            f"{name}.weight",
            f"missing{' (found weight_packed)' if packed else ''} although format is {fmt!r}",
            "the model fails to load",
        )
        return None
    ok = True
    if w.dtype != g.layout.weight_dtype:
        result.add(
            "tensors.dtype",
            f"{name}.weight",
            f"is {w.dtype}, but format {fmt!r} with {g.weight_type} weights stores"
            f" {g.layout.weight_dtype}",
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
    for extra in (PACKED, SHAPE):
        if f"{name}.{extra}" in tensors:
            result.add(
                "tensors.layout",
                f"{name}.{extra}",
                f"present although format is {fmt!r}",
                "loaders report an unexpected key",
                WARNING,
            )
    return w, (w.shape[0], w.shape[1]), ok


def _check_packed(
    name: str, packed: TensorInfo, shape_t: TensorInfo | None, result: Contract
) -> tuple[int, int] | None:
    if packed.dtype != INT32 or len(packed.shape) != 2:
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
