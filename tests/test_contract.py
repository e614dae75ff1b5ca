"""Contract checks from headers and raw scale bytes: torch-free, and exact on every float."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from qcli import checks
from qcli.checks import raw
from qcli.cli.app import main
from qcli.tensors import TensorInfo, open_checkpoint, read_header
from tests.builders import EXAMPLE, REPO

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("contract") / "W8A8"
    assert main(["quantize", str(EXAMPLE), str(out), "--lm-head", "--quiet"]) == 0
    return out


def _edit(out: Path, fn) -> None:
    cfg = json.loads((out / "config.json").read_text())
    fn(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))


def _checks(out: Path, severity: str = checks.ERROR) -> set[str]:
    _, found = checks.check_folder(out)
    return {f.check for f in found.findings if f.severity == severity}


def test_contract_runs_without_torch(w8a8: Path) -> None:
    """`inspect` calls the contract checks and must not import torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from qcli.checks import check_folder\n"
        f"ck, found = check_folder({str(w8a8)!r})\n"
        "print(found.ok, len(found.modules), found.lm_head.on_disk)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "15", "quantized"]


def test_correct_output(w8a8: Path) -> None:
    ck, found = checks.check_folder(w8a8)
    assert found.ok and not found.findings
    assert [m.name for m in found.modules][-1] == "model.layers.1.self_attn.v_proj"
    head = found.lm_head
    assert head.on_disk == "quantized" and head.transformers and head.vllm and not head.tied
    qm = next(m for m in found.modules if m.name == "lm_head")
    assert qm.shape == (1024, 256) and qm.scheme.name == "W8A8" and qm.scale.shape == (1024, 1)
    json.dumps(found.to_json())  # serializable as is


# --- raw scale values ---------------------------------------------------------------------


def _scale_file(tmp_path: Path, values: list[float], dtype: str) -> TensorInfo:
    t = torch.tensor(values, dtype=torch.float32).to(TORCH_DTYPES[dtype]).reshape(-1, 1)
    save_file({"s": t}, tmp_path / "s.safetensors")
    return read_header(tmp_path / "s.safetensors")[1]["s"]


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_first_bad_scale(tmp_path: Path, dtype: str) -> None:
    tiny = torch.finfo(TORCH_DTYPES[dtype]).tiny / 4  # a subnormal: positive, so fine
    info = _scale_file(tmp_path, [1.0, tiny, 3.5], dtype)
    assert raw.first_bad_scale(info) is None
    for bad in (0.0, -0.0, -1.0, math.inf, -math.inf, math.nan):
        info = _scale_file(tmp_path, [1.0, 2.0, bad, 0.5], dtype)
        row, value = raw.first_bad_scale(info)
        assert row == 2
        assert (math.isnan(value) and math.isnan(bad)) or value == bad


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["F32", "BF16", "F16"]),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=40),
)
def test_scale_check_agrees_with_torch(tmp_path_factory, dtype: str, values: list[float]) -> None:
    tmp = tmp_path_factory.mktemp("h")
    t = torch.tensor(values, dtype=torch.float32).to(TORCH_DTYPES[dtype]).reshape(-1, 1)
    save_file({"s": t}, tmp / "s.safetensors")
    info = read_header(tmp / "s.safetensors")[1]["s"]
    decoded = raw.decode_floats(info)
    want = t.float().flatten().tolist()
    assert all(
        (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(decoded, want, strict=True)
    )
    good = torch.isfinite(t.float()) & (t.float() > 0)
    bad = raw.first_bad_scale(info)
    if bool(good.all()):
        assert bad is None
    else:
        assert bad is not None and bad[0] == int((~good.flatten()).nonzero()[0, 0])


# --- config ---------------------------------------------------------------------------------


def test_config_findings(w8a8: Path, tmp_path: Path) -> None:
    cases = {
        "newer_arg_key": (lambda qc: qc["config_groups"]["group_0"]["weights"].update(zp_dtype=None), "config.arg_keys", checks.WARNING),  # noqa: E501
        "kv_cache": (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8}), "config.kv_cache_scheme", checks.WARNING),  # noqa: E501
        "bad_regex": (lambda qc: qc.update(ignore=["re:("]), "config.ignore", checks.ERROR),
        "asymmetric": (lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False), "config.scheme", checks.ERROR),  # noqa: E501
        "stray_target": (lambda qc: qc["config_groups"]["group_0"]["targets"].append("re:.*nothing$"), "config.targets", checks.WARNING),  # noqa: E501
        "output_acts": (lambda qc: qc["config_groups"]["group_0"].update(output_activations={"num_bits": 8}), "config.scheme", checks.ERROR),  # noqa: E501
        "groups_empty": (lambda qc: qc.update(config_groups={}), "config.config_groups", checks.ERROR),  # noqa: E501
    }  # fmt: skip
    for name, (fn, check, severity) in cases.items():
        out = tmp_path / name
        shutil.copytree(w8a8, out)
        _edit(out, fn)
        assert check in _checks(out, severity), name


def test_two_groups_follow_compressed_tensors_precedence(w8a8: Path, tmp_path: Path) -> None:
    """A name target beats a class target whatever the group order, as in compressed-tensors;
    a second group for lm_head with the same scheme is fine, with another scheme it is not."""
    out = tmp_path / "out"
    shutil.copytree(w8a8, out)

    def split(qc: dict) -> None:
        g = qc["config_groups"]["group_0"]
        qc["config_groups"] = {
            "group_0": {**g, "targets": ["Linear"]},
            "group_1": {**g, "targets": ["lm_head"]},
        }

    _edit(out, split)
    _, found = checks.check_folder(out)
    assert found.ok, [str(f) for f in found.findings]
    assert next(m for m in found.modules if m.name == "lm_head").group == "group_1"

    def fp8_head(qc: dict) -> None:
        g1 = qc["config_groups"]["group_1"]
        g1["weights"]["type"] = g1["input_activations"]["type"] = "float"
        g1["format"] = "float-quantized"

    _edit(out, fp8_head)
    found_checks = _checks(out)
    assert {"tensors.dtype", "config.format"} <= found_checks  # int8 tensors; top-level disagrees


def test_fp8_weight_only_lm_head_is_flagged(tmp_path: Path) -> None:
    out = tmp_path / "fp8"
    assert (
        main(["quantize", str(EXAMPLE), str(out), "--scheme", "FP8", "--lm-head", "--quiet"]) == 0
    )
    # a warning, not an error: transformers loads it, current vLLM cannot
    assert _checks(out) == set()
    assert _checks(out, checks.WARNING) == {"lm_head.scheme"}


def test_weight_shape_read_from_raw_bytes(tmp_path: Path) -> None:
    out = tmp_path / "w8a16"
    assert main(["quantize", str(EXAMPLE), str(out), "--scheme", "W8A16", "--quiet"]) == 0
    ck = open_checkpoint(out)
    info = ck.tensors["model.layers.0.mlp.down_proj.weight_shape"]
    assert struct.unpack("<2q", raw.read_raw(info)) == (256, 512)
    found = checks.check(ck)
    assert found.ok and found.lm_head.on_disk == "dense" and "lm_head" in found.dense_linear
    qm = next(m for m in found.modules if m.name == "model.layers.0.mlp.down_proj")
    assert qm.shape == (256, 512) and qm.weight.name.endswith("weight_packed")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
PATHS = [
    (), ("format",), ("quantization_status",), ("quant_method",), ("ignore",), ("config_groups",),
    ("config_groups", "group_0"), ("config_groups", "group_0", "targets"),
    ("config_groups", "group_0", "format"), ("config_groups", "group_0", "weights"),
    ("config_groups", "group_0", "weights", "type"),
    ("config_groups", "group_0", "weights", "strategy"),
    ("config_groups", "group_0", "input_activations"), ("kv_cache_scheme",),
]  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PATHS), JSON), min_size=1, max_size=3))
def test_any_config_gives_findings_not_crashes(w8a8: Path, edits) -> None:
    """Whatever a hand edit leaves in quantization_config, the checks report, never raise."""
    ck = open_checkpoint(w8a8)
    cfg = json.loads(json.dumps(ck.config))
    for path, value in edits:
        node = cfg
        for key in ("quantization_config", *path[:-1]):
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[path[-1] if path else "quantization_config"] = value
    ck.config = cfg
    found = checks.check(ck)
    json.dumps(found.to_json())
