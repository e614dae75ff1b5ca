"""qcli verify: no false alarm on correct checkpoints, and a zoo of planted corruptions that
each fail with a non-zero exit, a one-line reason and no traceback.

Every corruption copies a correct output of examples/tiny-llama (quantized once per module)
and breaks it the way a buggy writer or a hand edit would: a safetensors file rewritten with
safetensors.torch, or config.json edited.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qcli import gemm, layout, quant
from qcli.checks import QuantModule
from qcli.cli.app import main
from qcli.numerics import activations as acts
from qcli.numerics import layers, thresholds
from qcli.numerics.metrics import compare
from qcli.numerics.reference import DenseWeight
from qcli.schemes import SCHEMES
from qcli.tensors import open_checkpoint
from tests.builders import EXAMPLE
from tests.zoo import Case, Zoo

SCHEME_NAMES = ["W8A8", "W8A16", "FP8_DYNAMIC"]
LAYER = "model.layers.1.mlp.down_proj"  # [256, 512]
ROW = 5
FAST = ["--tokens", "1,8"]  # two batches keep the zoo quick; the default runs three
# The zoo's numeric runs cover the layers it corrupts (and lm_head), not all 15: the contract
# checks read every tensor regardless.
ZOO_LAYERS = r"layers\.1\.mlp\.down_proj$|layers\.0\.self_attn\.(q|o)_proj$|lm_head"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """A correct --lm-head output of the example per scheme (plus FP8 without lm_head)."""
    root = tmp_path_factory.mktemp("verify-outputs")
    made = {}
    for scheme in SCHEME_NAMES + ["FP8"]:
        out = root / scheme
        args = ["quantize", str(EXAMPLE), str(out), "--scheme", scheme, "--quiet"]
        assert main(args + ([] if scheme == "FP8" else ["--lm-head"])) == 0
        made[scheme] = out
    return made


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _verify(capsys, out: Path, *extra: str) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = main(["verify", str(out), "--json", *FAST, *extra])
    captured = capsys.readouterr()
    body = json.loads(captured.out) if captured.out.strip() else {}
    return code, body, captured.err


# --- corruption helpers -----------------------------------------------------------------------


def _file_of(out: Path, name: str) -> Path:
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            if name in h.keys():
                return f
    raise KeyError(name)


def edit_tensors(out: Path, name: str, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the file holding tensor `name` after `fn` edits its tensors in place."""
    f = _file_of(out, name)
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def edit_config(out: Path, fn: Callable[[dict], None]) -> None:
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg, indent=2))


def _qc(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda out: edit_config(out, lambda cfg: fn(cfg["quantization_config"]))


def _group(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return _qc(lambda qc: fn(qc["config_groups"]["group_0"]))


def _weight_name(out: Path, module: str) -> str:
    with open(out / "config.json") as f:
        packed = json.load(f)["quantization_config"]["format"] == "pack-quantized"
    return f"{module}.weight_packed" if packed else f"{module}.weight"


def _set_scale(module: str, fn: Callable[[torch.Tensor], None]) -> Callable[[Path], None]:
    name = f"{module}.weight_scale"

    def corrupt(out: Path) -> None:
        def edit(t: dict) -> None:
            s = t[name].float()
            fn(s)
            t[name] = s.to(t[name].dtype)

        edit_tensors(out, name, edit)

    return corrupt


def _edit_q(module: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """Edit a module's quantized weight as int8 / fp8 values, whatever its storage."""

    def corrupt(out: Path) -> None:
        name = _weight_name(out, module)

        def edit(t: dict) -> None:
            w = t[name]
            if name.endswith("_packed"):
                shape = tuple(t[f"{module}.weight_shape"].tolist())
                t[name] = layout.pack_int8(fn(layout.unpack_int8(w, shape)))
            else:
                t[name] = fn(w)

        edit_tensors(out, name, edit)

    return corrupt


def _negate_row(q: torch.Tensor) -> torch.Tensor:
    q = q.clone()
    q[ROW] = (-q[ROW].float()).to(q.dtype)
    return q


def _zero_row(q: torch.Tensor) -> torch.Tensor:
    q = q.clone()
    q[ROW] = torch.zeros_like(q[ROW].float()).to(q.dtype)
    return q


def _swap_tensors(a: str, b: str) -> Callable[[Path], None]:
    """Swap two same-shaped modules' weights and scales (a writer mixing up names)."""

    def corrupt(out: Path) -> None:
        wa, wb = _weight_name(out, a), _weight_name(out, b)

        def edit(t: dict) -> None:
            for x, y in ((wa, wb), (f"{a}.weight_scale", f"{b}.weight_scale")):
                t[x], t[y] = t[y], t[x]

        edit_tensors(out, wa, edit)

    return corrupt


def _drop(name: str) -> Callable[[Path], None]:
    return lambda out: edit_tensors(out, name, lambda t: t.pop(name))


def _dense_not_ignored(module: str) -> Callable[[Path], None]:
    """Write a module back dense (its dequantized weight) without listing it in ignore."""

    def corrupt(out: Path) -> None:
        name = _weight_name(out, module)

        def edit(t: dict) -> None:
            scale = t.pop(f"{module}.weight_scale")
            q = t.pop(name)
            if name.endswith("_packed"):
                q = layout.unpack_int8(q, tuple(t.pop(f"{module}.weight_shape").tolist()))
            t[f"{module}.weight"] = quant.dequantize(q, scale, torch.bfloat16)

        edit_tensors(out, name, edit)

    return corrupt


def _and(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    def corrupt(out: Path) -> None:
        for fn in fns:
            fn(out)

    return corrupt


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(key, value)


def _del(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


def _scale_to(dtype: torch.dtype, module: str = LAYER) -> Callable[[Path], None]:
    name = f"{module}.weight_scale"
    return lambda out: edit_tensors(out, name, lambda t: t.__setitem__(name, t[name].to(dtype)))


def _scale_1d(module: str = LAYER) -> Callable[[Path], None]:
    name = f"{module}.weight_scale"
    return lambda out: edit_tensors(out, name, lambda t: t.__setitem__(name, t[name].reshape(-1)))


def _weight_as_uint8(module: str = LAYER) -> Callable[[Path], None]:
    name = f"{module}.weight"
    return lambda out: edit_tensors(
        out, name, lambda t: t.__setitem__(name, t[name].view(torch.uint8))
    )


def _group_format_changed(out: Path) -> None:
    """Only the group's format changes, to one the tensors are not stored in."""

    def edit(g: dict) -> None:
        g["format"] = "float-quantized" if g["format"] == "int-quantized" else "int-quantized"

    _group(edit)(out)


def _row_mul(k: float) -> Callable[[torch.Tensor], None]:
    def fn(s: torch.Tensor) -> None:
        s[ROW] *= k

    return fn


def _row_set(v: float) -> Callable[[torch.Tensor], None]:
    def fn(s: torch.Tensor) -> None:
        s[ROW] = v

    return fn


def _all_mul(k: float) -> Callable[[torch.Tensor], None]:
    return lambda s: s.mul_(k)


# name -> (corruption, the finding check id or "numeric", schemes it applies to)
ALL = tuple(SCHEME_NAMES)
# name -> (corrupt(out), the check that must fail, the schemes to corrupt)
_CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    # numeric: only running the layer against its source shows these
    "scale_row_x4": (_set_scale(LAYER, _row_mul(4.0)), "numeric", ALL),
    "weight_row_negated": (_edit_q(LAYER, _negate_row), "numeric", ALL),
    "weight_row_zeroed": (_edit_q(LAYER, _zero_row), "numeric", ("W8A8",)),
    "layer_scales_x2": (_set_scale(LAYER, _all_mul(2.0)), "numeric", ("W8A8",)),
    "lm_head_scale_row_x4": (_set_scale("lm_head", _row_mul(4.0)), "numeric", ("W8A8",)),
    "swapped_q_o": (
        _swap_tensors("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"),
        "numeric",
        ("W8A8", "W8A16"),
    ),
    # scale values
    "nan_scale": (_set_scale(LAYER, _row_set(math.nan)), "tensors.scale_value", ALL),
    "zero_scale": (_set_scale(LAYER, _row_set(0.0)), "tensors.scale_value", ALL),
    "inf_scale": (_set_scale(LAYER, _row_set(math.inf)), "tensors.scale_value", ("W8A8",)),
    "negative_scale": (_set_scale(LAYER, _row_mul(-1.0)), "tensors.scale_value", ("W8A8",)),
    # tensors against the config
    "lm_head_scale_removed": (_drop("lm_head.weight_scale"), "tensors.scale", ALL),
    "scale_1d": (_scale_1d(), "tensors.scale", ("W8A8",)),
    "scale_int32": (_scale_to(torch.int32), "tensors.scale", ("W8A8",)),
    "weight_uint8": (_weight_as_uint8(), "tensors.dtype", ("W8A8",)),
    "dense_not_ignored": (_dense_not_ignored(LAYER), "tensors.dense_not_ignored", ALL),
    "weight_removed": (_drop(f"{LAYER}.weight"), "tensors.layout", ("W8A8",)),
    "packed_shape_wrong": (
        lambda out: edit_tensors(
            out,
            f"{LAYER}.weight_shape",
            lambda t: t.__setitem__(f"{LAYER}.weight_shape", torch.tensor([256, 508])),
        ),
        "tensors.shape",
        ("W8A16",),
    ),
    # config
    "status_removed": (_qc(_del("quantization_status")), "config.quantization_status", ALL),
    "status_frozen": (
        _qc(_set("quantization_status", "frozen")),
        "config.quantization_status",
        ("W8A8",),
    ),  # noqa: E501
    "format_removed": (_qc(_del("format")), "config.format", ALL),
    "group_format_removed": (_group(_del("format")), "config.format", ("W8A8",)),
    "quant_method_changed": (_qc(_set("quant_method", "fp8")), "config.quant_method", ("W8A8",)),
    "quantization_config_removed": (
        lambda out: edit_config(out, _del("quantization_config")),
        "config.quantization_config",
        ("W8A8",),
    ),
    "unknown_arg_key": (
        _group(lambda g: g["weights"].__setitem__("scale_bits", 8)),
        "config.arg_keys",
        ("W8A8",),
    ),
    "unknown_group_key": (_group(_set("kv_cache", None)), "config.group_keys", ("W8A8",)),
    "group_format_changed": (_group_format_changed, "config.format", ALL),
    "group_format_mismatch": (
        _and(_group(_set("format", "float-quantized")), _qc(_set("format", "float-quantized"))),
        "config.format",
        ("W8A8",),
    ),
    "group_format_packed": (_group(_set("format", "pack-quantized")), "tensors.layout", ("W8A8",)),
    "w8a16_as_naive": (
        _and(_group(_set("format", "naive-quantized")), _qc(_set("format", "naive-quantized"))),
        "config.format",
        ("W8A16",),
    ),
    # lm_head and vLLM's rules
    "lm_head_dropped_from_targets": (
        _group(_set("targets", ["Linear"])),
        "lm_head.targets",
        ALL,
    ),
    "lm_head_ignored_but_int8": (
        _qc(_set("ignore", ["lm_head"])),
        "tensors.outside_targets",
        ("W8A8",),
    ),
    "tied_flag_set": (
        lambda out: edit_config(out, _set("tie_word_embeddings", True)),
        "lm_head.tied",
        ("W8A8",),
    ),
    "fused_part_dense": (
        _and(
            _dense_not_ignored("model.layers.0.self_attn.k_proj"),
            _qc(_set("ignore", ["model.layers.0.self_attn.k_proj"])),
        ),
        "fused",
        ("W8A8",),
    ),
    "embedding_quantized": (
        lambda out: edit_tensors(
            out,
            "model.embed_tokens.weight",
            lambda t: t.__setitem__(
                "model.embed_tokens.weight_scale",
                torch.ones(t["model.embed_tokens.weight"].shape[0], 1),
            ),
        ),
        "tensors.outside_targets",
        ("W8A8",),
    ),
    "norm_changed": (
        lambda out: edit_tensors(
            out,
            "model.norm.weight",
            lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"] * 2),
        ),
        "reference.dense",
        ("W8A8",),
    ),
    "file_metadata_tf_bad": (
        lambda out: save_file(
            load_file(out / "model.safetensors"),
            out / "model.safetensors",
            metadata={"format": "np"},
        ),
        "files.metadata",
        ("W8A8",),
    ),
}

ZOO = Zoo()
for _name, (_corrupt, _check, _schemes) in _CORRUPTIONS.items():
    ZOO.add(_name, _corrupt, _check, variants=_schemes)


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_correct_checkpoint_verifies(outputs, capsys, scheme: str) -> None:
    code, body, err = _verify(capsys, outputs[scheme], "--reference", str(EXAMPLE))
    assert code == 0, err
    assert body["ok"] and body["contract"]["ok"] and not body["contract"]["errors"]
    head = body["lm_head"]
    assert head["module"] == "lm_head" and head["ok"] and head["scheme"] == scheme
    assert head["compared_with"] == "reference"
    for key in ("sqnr_db", "cosine", "max_rel_err", "channel_err"):
        assert isinstance(head[key], float)
    assert len(body["layers"]) == 15 and all(x["ok"] for x in body["layers"])


def test_fp8_weight_only_without_lm_head_verifies(outputs, capsys) -> None:
    code, body, err = _verify(capsys, outputs["FP8"])
    assert code == 0, err
    assert body["reference"]["origin"] == "qcli_provenance.json"
    assert body["lm_head"] is None and body["contract"]["lm_head"]["on_disk"] == "dense"


def test_dequantized_mode_verifies(outputs, capsys) -> None:
    code, body, err = _verify(capsys, outputs["W8A16"], "--no-reference")
    assert code == 0, err
    assert body["compared_with"] == "dequantized" and body["reference"] is None
    assert body["kernels"]["W8A16"]["check"] in ("exact", "float rounding")


@pytest.mark.parametrize(("c", "scheme"), ZOO.params())
def test_zoo_corruption_fails(outputs, tmp_path: Path, capsys, c: Case, scheme: str) -> None:
    (check,) = c.expect
    out = _copy(outputs[scheme], tmp_path / "out")
    c.make(out)
    # reference: the source, found through qcli_provenance.json
    code, body, err = _verify(capsys, out, "--layers", ZOO_LAYERS)
    assert code == 1, (code, err)
    assert "internal error" not in err and "Traceback" not in err
    assert not body["ok"]
    if check == "numeric":
        failed = body["summary"]["failed_layers"]
        assert failed, body["findings"]
    else:
        checks = {f["check"] for f in body["findings"] if f["severity"] == "error"}
        assert check in checks, body["findings"]


def test_zoo_has_fifteen_kinds() -> None:
    assert len(ZOO) >= 15


def test_row_corruptions_need_the_reference(outputs, tmp_path: Path, capsys) -> None:
    """Without the source, a negated row is a valid checkpoint of another weight: verify
    says what it compared with instead of pretending."""
    out = _copy(outputs["W8A8"], tmp_path / "out")
    _edit_q(LAYER, _negate_row)(out)
    code, body, _ = _verify(capsys, out, "--no-reference")
    assert code == 0 and body["compared_with"] == "dequantized"
    code, body, _ = _verify(capsys, out, "--reference", str(EXAMPLE))
    assert code == 1 and body["summary"]["failed_layers"] == [LAYER]
    bad = next(x for x in body["layers"] if x["module"] == LAYER)
    assert bad["worst_channel"] == ROW


def test_unusable_input_exits_2(outputs, tmp_path: Path, capsys) -> None:
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert main(["verify", str(EXAMPLE)]) == 2  # dense: nothing to verify
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    save_file({"x.weight": torch.zeros(3, 4)}, other / "model.safetensors")
    assert main(["verify", str(outputs["W8A8"]), "--reference", str(other)]) == 2
    assert main(["verify", str(outputs["W8A8"]), "--layers", "nothing-matches"]) == 2
    assert main(["verify", str(outputs["W8A8"]), "--e2e", "--no-reference"]) == 2
    assert main(["verify", str(outputs["W8A8"]), "--tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err


def test_broken_index_is_a_finding(models, tmp_path: Path, capsys) -> None:
    src = models["llama-sharded"]
    out = tmp_path / "out"
    assert (
        main(["quantize", str(src), str(out), "--lm-head", "--quiet", "--max-shard-size", "300KB"])
        == 0
    )  # noqa: E501
    code, body, err = _verify(capsys, out)
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 1
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    code, body, _ = _verify(capsys, out)
    assert code == 0 and any(f["check"] == "index.total_size" for f in body["findings"])
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, body, err = _verify(capsys, out)
    assert code == 1 and body["findings"][0]["check"] == "files", err


def test_scale_in_another_shard_is_fine(models, tmp_path: Path, capsys) -> None:
    """format.md: a scale may sit in another shard than its weight."""
    src, out = models["llama-sharded"], tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet", "--max-shard-size", "300KB"]) == 0
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wmap = index["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight_scale"
    here = wmap[name]
    there = next(f for f in sorted(set(wmap.values())) if f != here)
    moved = load_file(out / here).pop(name)
    rest = {k: v for k, v in load_file(out / here).items() if k != name}
    save_file(rest, out / here, metadata={"format": "pt"})
    save_file({**load_file(out / there), name: moved}, out / there, metadata={"format": "pt"})
    wmap[name] = there
    index_path.write_text(json.dumps(index))
    code, body, err = _verify(capsys, out)
    assert code == 0, (err, body["findings"])


def test_tied_source_untied_lm_head(models, tmp_path: Path, capsys) -> None:
    """A tied source quantized with --lm-head: lm_head is compared with the embedding table."""
    src = models["qwen2"]
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--lm-head", "--quiet"]) == 0
    code, body, err = _verify(capsys, out, "--reference", str(src))
    assert code == 0, err
    assert body["lm_head"]["reference_tensor"] == "model.embed_tokens.weight"
    out2 = tmp_path / "out2"
    assert main(["quantize", str(src), str(out2), "--quiet"]) == 0  # lm_head stays tied
    code, body, err = _verify(capsys, out2, "--reference", str(src))
    assert code == 0, err
    assert body["contract"]["lm_head"]["tied"] and body["lm_head"] is None
    # tied, lm_head in ignore: dropping it from ignore makes transformers quantize it
    _qc(_set("ignore", []))(out2)
    code, body, _ = _verify(capsys, out2)
    assert code == 1 and any(f["check"] == "lm_head.tied" for f in body["findings"])


def test_layers_filter_and_fast(outputs, capsys) -> None:
    code, body, _ = _verify(capsys, outputs["W8A8"], "--layers", "lm_head|q_proj", "--fast")
    assert code == 0
    assert sorted(x["module"] for x in body["layers"]) == [
        "lm_head",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    head = body["lm_head"]
    assert head["rows_checked"] == layers.FAST_ROWS and head["tokens"] == list(acts.FAST_TOKENS)


def test_table_output(outputs, capsys) -> None:
    capsys.readouterr()
    assert main(["verify", str(outputs["W8A8"]), *FAST]) == 0
    out = capsys.readouterr().out  # the report is the result: stdout (`verify X > report.txt`)
    assert "lm_head" in out and "verify: ok" in out and "torch._int_mm" in out


# --- the numbers themselves --------------------------------------------------------------------


def _module(tmp_path: Path, w: torch.Tensor, scheme: str) -> tuple[QuantModule, DenseWeight]:
    """Quantize `w` into a one-layer file; returns the module and its dense reference."""
    s = SCHEMES[scheme]
    q, scale = quant.quantize_weight(w, s.qtype, torch.float32)
    stored = {"m.weight_scale": scale, "m.weight": q, "ref.weight": w}
    if s.layout.packed:
        stored["m.weight_packed"] = layout.pack_int8(stored.pop("m.weight"))
    save_file(stored, tmp_path / "one.safetensors")
    ck = open_checkpoint(tmp_path, require_config=False)
    weight = ck.tensors["m.weight_packed" if s.layout.packed else "m.weight"]
    qm = QuantModule("m", None, "group_0", s, weight, ck.tensors["m.weight_scale"], tuple(w.shape))
    return qm, DenseWeight(ck.tensors["ref.weight"])


def _float32_gemm_error(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-element bound on how far two float32 computations of ``x @ w.T`` may differ.

    Each is within ``gamma_K * (|x| @ |w|.T)`` of the exact product, whatever the summation
    order a BLAS picks for the shapes at hand (Higham, Accuracy and Stability, 3.1), with
    ``gamma_K = K u / (1 - K u)``, ``u = 2**-24``; two of them differ by twice that. Three
    more roundings of the quantized kernels' epilogue (scale products) add ``3 u |x @ w.T|``.
    """
    k = x.shape[1]
    u = 2.0**-24
    gamma = k * u / (1 - k * u)
    mag = x.double().abs() @ w.double().abs().t()
    return 2 * gamma * mag + 3 * u * mag


def _metric_bounds(y: torch.Tensor, ref: torch.Tensor, dy: torch.Tensor, dr: torch.Tensor):
    """How far compare()'s metrics can move when y and ref move by at most dy and dr per
    element (first order, with the squares of the perturbations added)."""
    y, ref = y.double(), ref.double()
    d = (y - ref).abs()
    dd = dy + dr
    sig, noise = float(ref.square().sum()), float(d.square().sum())
    d_sig = float((2 * ref.abs() * dr + dr.square()).sum())
    d_noise = float((2 * d * dd + dd.square()).sum())
    sqnr = 10 / math.log(10) * (d_sig / sig + d_noise / noise)
    ey = float(dy.square().sum().sqrt()) / float(y.square().sum().sqrt())
    er = float(dr.square().sum().sqrt()) / math.sqrt(sig)
    cos = float((y * ref).sum()) / math.sqrt(float(y.square().sum()) * sig)
    cosine = 2 * (ey + er) * math.sqrt(max(0.0, 1 - cos * cos)) + 2 * (ey + er) ** 2
    top = float(ref.abs().max())
    rel = float(dd.max()) / top + float(d.max()) * float(dr.max()) / top**2 * 2
    return sqnr, cosine, rel


@pytest.mark.parametrize("scheme", ["W8A8", "W8A16", "FP8_DYNAMIC", "FP8"])
def test_metrics_match_gemm_compare(tmp_path: Path, scheme: str) -> None:
    """Streaming in row blocks gives gemm.compare's numbers on the whole output.

    Blocks of 7 rows and the whole weight reach BLAS (and fp8's float-accumulating kernel)
    with other shapes, so float32 sums run in other orders: the two agree within the float32
    rounding bound of a K-term dot product, carried through each metric, not to a fixed
    relative tolerance that one CPU's kernels happen to meet."""
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    qm, ref = _module(tmp_path, w, scheme)
    files = layers.Files()
    try:
        old = layers.BLOCK_ELEMENTS
        layers.BLOCK_ELEMENTS = 64 * 7  # 7 rows a block: many blocks, a ragged last one
        r = layers.verify_layer(qm, ref, layers.VerifyOptions(tokens=(5,)), files)
    finally:
        layers.BLOCK_ELEMENTS = old
        files.close()
    (x,) = acts.activations("m", 64, (5,))
    q, s = quant.quantize_weight(w, SCHEMES[scheme].qtype, torch.float32)
    y = layers.run_kernel(SCHEMES[scheme], x, q, s).out
    dense = gemm.dense(x, w)
    want = compare(y, dense)
    # W8A8's integer accumulation is exact: only its epilogue and the dense side round.
    kernel_err = _float32_gemm_error(x, quant.dequantize(q, s))
    dy = 3 * 2.0**-24 * y.double().abs() if scheme == "W8A8" else kernel_err
    tol_sqnr, tol_cos, tol_rel = _metric_bounds(y, dense, dy, _float32_gemm_error(x, w))
    assert abs(r.sqnr_db - want["sqnr_db"]) <= tol_sqnr
    assert abs(r.cosine - want["cosine"]) <= tol_cos
    assert abs(r.max_rel_err - want["max_rel_err"]) <= tol_rel
    # the bounds are tight enough to mean something: far below the metrics' own spread
    assert tol_sqnr < 0.1 and tol_cos < 1e-4 and tol_rel < 1e-2
    assert r.ok and r.kernel_check in ("exact", "float rounding")


def test_inexact_kernel_is_blamed_not_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A saturating int8 kernel (modelled by gemm's VPMADDUBSW emulation) is reported as the
    kernel's error, and the layer is judged on exact integer math."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    qm, ref = _module(tmp_path, w, "W8A8")

    exact_kernel = gemm.w8a8_int8

    def saturating(x, q_w, w_scale, check=None):
        xq, xs = gemm.quantize_activations_int8(x)
        acc = gemm.saturating_u8s8_emulation(xq, q_w)
        out = (acc.float() * w_scale.float().reshape(1, -1)) * xs
        # checked as every kernel is: against exact arithmetic on the same operands
        ref = exact_kernel(x, q_w, w_scale, check=True).reference
        return gemm.GemmRun(out, "saturating int8 (model)", None, "", ref, gemm.deviation(out, ref))

    monkeypatch.setattr(gemm, "w8a8_int8", saturating)
    files = layers.Files()
    try:
        r = layers.verify_layer(qm, ref, layers.VerifyOptions(saturation=True), files)
    finally:
        files.close()
    assert r.kernel_check == "inexact" and r.kernel_dev > thresholds.KERNEL_TOLERANCE
    assert r.ok, r.failures
    assert r.saturating_dev is not None and r.saturating_dev > 0
    assert any("not the checkpoint" in n for n in r.notes)


def test_activations_are_seeded_with_outliers() -> None:
    a = acts.activations("layer", 512, (1, 7))
    b = acts.activations("layer", 512, (1, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    absmax = a[1].abs().amax(0)
    assert int((absmax > 8).sum()) >= 512 // acts.OUTLIER_EVERY
    assert [x.shape[0] for x in a] == [1, 7]


def test_stale_provenance_source_falls_back(outputs, tmp_path: Path, capsys) -> None:
    """A source recorded in qcli_provenance.json that no longer matches is not an error:
    verify says so and compares with the dequantized weights."""
    out = _copy(outputs["W8A8"], tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    save_file({"x.weight": torch.zeros(3, 4)}, other / "model.safetensors")
    record = json.loads((out / "qcli_provenance.json").read_text())
    record["source"] = {"path": str(other)}
    (out / "qcli_provenance.json").write_text(json.dumps(record))
    code, body, err = _verify(capsys, out, "--layers", "lm_head")
    assert code == 0, err
    assert body["reference"] is None and "does not match" in body["reference_note"]
    record["source"] = {"path": str(tmp_path / "gone")}
    (out / "qcli_provenance.json").write_text(json.dumps(record))
    code, body, _ = _verify(capsys, out, "--layers", "lm_head")
    assert code == 0 and body["compared_with"] == "dequantized"
