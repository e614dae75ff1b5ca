"""Vision-language names: on disk `language_model.model.layers...` (Llava) or `model.layers...`
(Qwen2-VL), in transformers 5 `model.language_model.layers...` (qcli.names).

An exact --ignore entry in either spelling keeps the same module dense in qcli's plan, in the
written config (both spellings) and in transformers; verify flags a config that names a
module by its disk spelling alone (transformers would quantize it: NaN logits for Qwen2-VL).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qcli.cli.app import main
from qcli.names import Names
from qcli.tensors import open_checkpoint
from tests.builders import load_config, vlm

IDS = torch.tensor([[1, 17, 42, 99, 211, 7, 56, 3, 64, 128, 5, 200]])
DOWN = {  # layer 0's down_proj: (on disk, in transformers 5)
    "llava": (
        "language_model.model.layers.0.mlp.down_proj",
        "model.language_model.layers.0.mlp.down_proj",
    ),
    "qwen2_vl": ("model.layers.0.mlp.down_proj", "model.language_model.layers.0.mlp.down_proj"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {k: vlm(k, root / k) for k in DOWN}


def _load(path: Path):
    import transformers

    arch = load_config(path)["architectures"][0]
    model, info = getattr(transformers, arch).from_pretrained(
        path, output_loading_info=True, dtype=torch.float32
    )
    return model.eval(), info


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("kind", list(DOWN))
def test_names_are_transformers_own(models, kind):
    # every Linear on disk is the module qcli.names says transformers builds, and back
    model, _ = _load(models[kind])
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ck = open_checkpoint(models[kind])
    names = Names(ck.config)
    disk = {n.removesuffix(".weight") for n, t in ck.tensors.items()
            if n.endswith(".weight") and len(t.shape) == 2 and "embed" not in n}  # fmt: skip
    assert {names.loaded(n) for n in disk} == linear
    assert {names.on_disk(n) for n in linear} == disk


@pytest.mark.parametrize("kind", list(DOWN))
@pytest.mark.parametrize("spelling", [0, 1], ids=["disk", "transformers"])
def test_exact_ignore_means_one_module_everywhere(models, tmp_path, kind, spelling):
    out = tmp_path / "out"
    entry = DOWN[kind][spelling]
    assert main(["quantize", str(models[kind]), str(out), "-q", "--ignore", entry]) == 0
    ignore = load_config(out)["quantization_config"]["ignore"]
    assert set(DOWN[kind]) <= set(ignore)
    with safe_open(out / "model.safetensors", "pt") as h:
        assert h.get_tensor(f"{DOWN[kind][0]}.weight").dtype == torch.bfloat16
        assert h.get_tensor(DOWN[kind][0].replace("down_proj", "up_proj") + ".weight").dtype == (
            torch.int8
        )
    model, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    kept = model.get_submodule(DOWN[kind][1])
    assert getattr(kept, "quantization_scheme", None) is None
    up = model.get_submodule(DOWN[kind][1].replace("down_proj", "up_proj"))
    assert up.quantization_scheme is not None
    dense, _ = _load(models[kind])
    with torch.no_grad():
        assert _cos(model(IDS).logits, dense(IDS).logits) > 0.98
    assert main(["verify", str(out), "-q"]) == 0


@pytest.mark.parametrize("kind", list(DOWN))
def test_verify_catches_a_fault_in_a_vlm(models, tmp_path, kind):
    out = tmp_path / "out"
    assert main(["quantize", str(models[kind]), str(out), "-q"]) == 0
    shard = out / "model.safetensors"
    with safe_open(shard, "pt") as h:
        ts, meta = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()
    name = DOWN[kind][0].replace("layers.0", "layers.1") + ".weight_scale"
    ts[name][7] *= 4
    save_file(ts, shard, metadata=meta)
    assert main(["verify", str(out), "--no-reference", "-q"]) == 0
    assert main(["verify", str(out), "-q"]) == 1


def test_verify_flags_an_ignore_in_the_disk_spelling_alone(models, tmp_path, capsys):
    out = tmp_path / "out"
    disk, loaded = DOWN["qwen2_vl"]
    assert main(["quantize", str(models["qwen2_vl"]), str(out), "-q", "--ignore", disk]) == 0
    config = load_config(out)
    config["quantization_config"]["ignore"].remove(loaded)
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["verify", str(out), "--json", "-q"]) == 1
    found = [f for f in json.loads(capsys.readouterr().out)["findings"]]
    spelling = [f for f in found if f["check"] == "config.spelling"]
    assert [f["subject"] for f in spelling] == [disk]
