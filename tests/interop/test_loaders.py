"""qcli's output against the real loaders: transformers (both ways) and compressed-tensors.

For tiny untied Llama, tied Qwen2 and a multi-shard Llama, every scheme, with and without
--lm-head: the output loads with no missing/unexpected keys, its logits stay close to the
original's, every quantized weight decompresses within the format's error bound, and lm_head is
quantized if and only if asked, and then named in targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qcli.cli.app import main
from tests.builders import load_config

SCHEMES = ["W8A8", "W8A16", "FP8_DYNAMIC", "FP8"]
IDS = torch.tensor([[1, 17, 42, 99, 311, 7, 256, 3, 64, 128, 5, 200]])


def _quantize(src: Path, out: Path, scheme: str, lm_head: bool) -> Path:
    args = ["quantize", str(src), str(out), "--scheme", scheme, "--quiet", "--overwrite"]
    if "sharded" in src.name:
        args += ["--max-shard-size", "200KB"]
    assert main(args + (["--lm-head"] if lm_head else [])) == 0
    return out


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _source_weights(path: Path) -> dict[str, torch.Tensor]:
    return _all_tensors(path)


def _logits(path: Path, **kwargs) -> tuple[torch.Tensor, dict]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32, **kwargs
    )
    with torch.no_grad():
        return model(IDS).logits[0].float(), info


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _decompress_all(out: Path) -> dict[str, torch.Tensor]:
    """Every quantized module's weight, decompressed by compressed-tensors itself."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qc = load_config(out)["quantization_config"]
    group = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(
        targets=group["targets"],
        weights=QuantizationArgs(**group["weights"]),
        input_activations=(
            QuantizationArgs(**group["input_activations"]) if group["input_activations"] else None
        ),
    )
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    tensors = _all_tensors(out)
    result = {}
    for name in tensors:
        if not name.endswith(".weight_scale"):
            continue
        module = name.removesuffix(".weight_scale")
        local = {
            k.removeprefix(module + "."): v
            for k, v in tensors.items()
            if k.startswith(module + ".")
        }
        local = {k: v for k, v in local.items() if "." not in k}
        result[module] = compressor.decompress(local, scheme)["weight"]
    return result


def _check(src: Path, out: Path, scheme: str, lm_head: bool, tied: bool, capfd) -> None:
    from qcli.layout import unpack_int8
    from qcli.quant import quant_error_ratio

    cfg = load_config(out)
    qc = cfg["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["quantization_status"] == "compressed" and qc["format"] == group["format"]
    tensors = _all_tensors(out)
    assert ("lm_head.weight_scale" in tensors) == lm_head
    assert ("lm_head" in group["targets"]) == lm_head
    assert ("lm_head" in qc["ignore"]) == (not lm_head)
    if tied and lm_head:
        assert cfg["tie_word_embeddings"] is False
        assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16

    # compressed-tensors decompresses every weight within the format's bound
    src_w = _source_weights(src)
    if tied and lm_head:
        src_w["lm_head.weight"] = src_w["model.embed_tokens.weight"]
    dec = _decompress_all(out)
    assert ("lm_head" in dec) == lm_head
    kind = "int8" if scheme.startswith("W8") else "fp8"
    for module, w in dec.items():
        ref = src_w[module + ".weight"]
        scale = tensors[module + ".weight_scale"]
        q = tensors.get(module + ".weight")
        if q is None:
            q = unpack_int8(tensors[module + ".weight_packed"], tuple(ref.shape))
        ratio = quant_error_ratio(ref, w, q, scale, kind)
        assert (ratio <= 1).all(), f"{module}: error {ratio.max().item():.3f}x the bound"

    ref_logits, _ = _logits(src)
    for kwargs in ({}, {"dequantize": True}):
        qkw = {}
        if kwargs:
            from transformers.utils.quantization_config import CompressedTensorsConfig

            qkw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        capfd.readouterr()
        logits, info = _logits(out, **qkw)
        # transformers prints a LOAD REPORT for any missing/unexpected/mismatched key
        assert "LOAD REPORT" not in capfd.readouterr().err
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert not info.get("mismatched_keys"), info
        assert _cos(logits, ref_logits) > 0.98, (kwargs, _cos(logits, ref_logits))


@pytest.mark.parametrize("lm_head", [True, False])
def test_w8a8_llama(models, tmp_path: Path, lm_head: bool, capfd) -> None:
    """The default run's quick version of the matrix below."""
    out = _quantize(models["llama"], tmp_path / "out", "W8A8", lm_head)
    _check(models["llama"], out, "W8A8", lm_head, tied=False, capfd=capfd)


@pytest.mark.slow
@pytest.mark.parametrize("lm_head", [True, False])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model", ["llama", "qwen2", "llama-sharded"])
def test_every_scheme_loads(
    models, tmp_path: Path, model: str, scheme: str, lm_head: bool, capfd
) -> None:
    out = _quantize(models[model], tmp_path / "out", scheme, lm_head)
    if model == "llama-sharded":
        assert (out / "model.safetensors.index.json").exists()
    _check(models[model], out, scheme, lm_head, tied=model == "qwen2", capfd=capfd)


def test_rerun_is_byte_identical(models, tmp_path: Path) -> None:
    a = _quantize(models["llama-sharded"], tmp_path / "a", "W8A8", True)
    b = _quantize(models["llama-sharded"], tmp_path / "b", "W8A8", True)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n == "qcli_provenance.json":
            pa, pb = json.loads((a / n).read_text()), json.loads((b / n).read_text())
            assert pa == pb
            continue
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
