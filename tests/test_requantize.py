"""Quantized sources: block-FP8 releases (DeepSeek, Qwen3-*-FP8) and compressed-tensors
per-channel checkpoints, decoded and quantized again.

The release here is written by hand (tests/builders.block_fp8_release) with layers that are
partial 128 x 128 blocks, as real ones are; its dense values come from DeepSeek's formula,
computed apart from qcli.dequant. transformers' own CPU fp8 path is no reference: it decodes
partial blocks wrongly (finegrained_fp8.py infers the block from the scale grid).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qcli import quant
from qcli.cli.app import main
from tests.builders import block_fp8_release, load_config, qwen3_odd

IDS = torch.tensor([[1, 17, 42, 99, 311, 7, 256, 3, 64, 128, 5, 200]])


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("fp8")
    dense = qwen3_odd(root / "dense")
    decoded = block_fp8_release(dense, root / "fp8")
    return dense, root / "fp8", decoded


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _quantize(src: Path, out: Path, *args: str) -> Path:
    assert main(["quantize", str(src), str(out), "-q", *args]) == 0
    return out


@pytest.mark.parametrize("scheme", ["W8A8", "FP8_DYNAMIC"])
def test_release_is_requantized_from_its_decoded_values(release, tmp_path, scheme):
    _, fp8, decoded = release
    out = _quantize(fp8, tmp_path / "out", "--scheme", scheme)
    got = _tensors(out)
    assert not [n for n in got if n.endswith("weight_scale_inv")]
    qtype = "int8" if scheme == "W8A8" else "fp8"
    for name, w in decoded.items():
        # what quantizing the dense weights directly gives, scales in the model's bf16
        q, s = quant.quantize_weight(w, qtype, torch.bfloat16)
        assert torch.equal(got[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(got[name.removesuffix("weight") + "weight_scale"], s), name
    config = load_config(out)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert "weight_block_size" not in json.dumps(qc)


def test_transformers_loads_the_requantized_release(release, tmp_path):
    from transformers import AutoModelForCausalLM

    dense, fp8, decoded = release
    out = _quantize(fp8, tmp_path / "out", "--scheme", "W8A16")
    model, info = AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # the dense model the release stands for: its own weights replaced by the decoded ones
    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    with torch.no_grad():
        for name, w in decoded.items():
            ref.get_parameter(name).copy_(w)
        got, want = model(IDS).logits[0], ref(IDS).logits[0]
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.999


def test_ignored_layers_are_written_dense_as_decoded(release, tmp_path):
    _, fp8, decoded = release
    out = _quantize(fp8, tmp_path / "out", "--ignore", "re:.*down_proj")
    got = _tensors(out)
    down = [n for n in decoded if "down_proj" in n]
    for name in down:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], decoded[name].to(torch.bfloat16)), name
        assert name.removesuffix("weight") + "weight_scale" not in got


def test_verify_compares_with_the_decoded_release_and_catches_a_bad_row(release, tmp_path):
    _, fp8, _ = release
    out = _quantize(fp8, tmp_path / "out", "--scheme", "W8A8")
    assert main(["verify", str(out), "--json", "-q"]) == 0
    # a row scale x4: only a reference sees it (dequantized weights agree with themselves)
    shard = out / "model.safetensors"
    ts = _tensors(out)
    name = "model.layers.1.mlp.up_proj.weight_scale"
    ts[name] = ts[name].clone()
    ts[name][5] *= 4
    from safetensors.torch import save_file

    with safe_open(shard, "pt") as h:
        meta = h.metadata()
    save_file(ts, shard, metadata=meta)
    assert main(["verify", str(out), "--no-reference", "-q"]) == 0
    assert main(["verify", str(out), "--reference", str(fp8), "-q"]) == 1


def test_compressed_tensors_output_is_requantized(release, tmp_path):
    dense, _, _ = release
    fp8 = _quantize(dense, tmp_path / "fp8", "--scheme", "FP8_DYNAMIC")
    out = _quantize(fp8, tmp_path / "int8", "--scheme", "W8A8")
    src, got = _tensors(fp8), _tensors(out)
    for name in [n for n in src if n.endswith("_proj.weight")]:
        w = src[name].float() * src[name.removesuffix("weight") + "weight_scale"].float()
        q, s = quant.quantize_weight(w, "int8", torch.bfloat16)
        assert got[name].dtype == torch.int8
        assert torch.equal(got[name], q), name
    assert main(["verify", str(out), "-q"]) == 0


def test_inspect_says_what_a_release_becomes(release, capsys):
    _, fp8, _ = release
    assert main(["inspect", str(fp8), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    q = body["summary"]["quantization"] if "summary" in body else body["quantization"]
    assert q["stored_as"] == "fp8 e4m3 with 128x128 block scales"
    assert len(q["quantized_modules"]) == 14 and not q["unmatched_modules"]
    # and what a run does with it: every fp8 Linear re-quantized, no scale_inv copied
    plan = body["plan"]
    notes = {t["name"]: t for t in plan["tensors"]}
    assert not [n for n in notes if n.endswith("weight_scale_inv")]
    down = notes["model.layers.0.mlp.down_proj.weight"]
    assert down["action"] == "quantize" and "128x128 block" in json.dumps(down)


def test_ue8m0_scales_decode(tmp_path):
    dense = qwen3_odd(tmp_path / "dense", seed=1)
    decoded = block_fp8_release(dense, tmp_path / "fp8", scale_dtype=torch.float8_e8m0fnu)
    out = _quantize(tmp_path / "fp8", tmp_path / "out")
    got = _tensors(out)
    for name, w in decoded.items():
        q, _ = quant.quantize_weight(w, "int8", torch.bfloat16)
        assert torch.equal(got[name], q), name


def test_eval_reference_is_the_decoded_release(release):
    # eval and sensitivity score a release as the dense model it stands for (not through
    # transformers' CPU fp8 path, which gets partial blocks wrong)
    from transformers import AutoModelForCausalLM

    from qcli.evaluation.engines import TransformersModel

    dense, fp8, decoded = release
    model = TransformersModel(fp8, torch.float32)
    assert "decoded by qcli" in model.describe()["loader"]
    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    with torch.no_grad():
        for name, w in decoded.items():
            ref.get_parameter(name).copy_(w)
        # the same weights and the same computation: the same bits
        assert torch.equal(model.model(IDS).logits, ref(IDS).logits)
    model.close()


def test_verify_refuses_a_release_itself(release, capsys):
    _, fp8, _ = release
    assert main(["verify", str(fp8)]) == 2
    assert "block-fp8 release" in capsys.readouterr().err
