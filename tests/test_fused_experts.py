"""MoE experts stored fused on disk (Llama 4, GraniteMoE), split per expert (qcli.experts).

Tiny random models saved by transformers itself (tests/builders.fused_moe). The split is
checked against the model's own arithmetic (the expert's matmul in transformers'
orientation), the output against transformers loading it, and verify against the fused
source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qcli import experts, loaders
from qcli.cli.app import main
from qcli.tensors import open_checkpoint, read_rows
from tests.builders import fused_moe, load_config

IDS = torch.tensor([[1, 17, 42, 99, 211, 7, 56, 3, 64, 128, 5, 200]])
GRANITE_EXPERTS = r"re:.*block_sparse_moe\.experts\..*"


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {k: fused_moe(k, root / k) for k in ("llama4", "granitemoe")}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _logits(path: Path) -> tuple[torch.Tensor, dict]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32
    )
    with torch.no_grad():
        return model(IDS).logits[0], info


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _quantize(src: Path, out: Path, *args: str) -> Path:
    assert main(["quantize", str(src), str(out), "-q", *args]) == 0
    return out


@pytest.mark.parametrize("kind", ["llama4", "granitemoe"])
def test_split_computes_what_the_fused_expert_computes(moe, kind):
    ck = open_checkpoint(moe[kind])
    pieces = experts.split(ck.tensors, ck.config)
    assert len(pieces) == 2 * 3 * 4  # layers x projections x experts
    fused = _tensors(moe[kind])
    for name, piece in pieces.items():
        # float64: bf16 products are exact and sums of 64 of them all but exact, so two
        # orders of summation agree to 1e-12 and any misplaced element shows
        w = piece.rows(lambda t, a, b: read_rows(t, None, a, b), 0, piece.shape[0]).double()
        src, e = fused[piece.source.name].double(), piece.expert
        x = torch.randn(5, piece.shape[1], dtype=torch.float64)
        if kind == "llama4":  # modeling_llama4: torch.bmm(x, gate_up_proj), chunk(2, -1)
            full = x @ src[e]
        else:  # modeling_granitemoe: F.linear(x, input_linear[e]), chunk(2, -1)
            full = x @ src[e].t()
        pair = full.shape[1] == 2 * piece.size  # gate and up in one tensor
        want = full.chunk(2, -1)[0 if ".gate_proj" in name else 1] if pair else full
        torch.testing.assert_close(x @ w.t(), want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("scheme", ["W8A8", "W8A16", "FP8_DYNAMIC"])
def test_llama4_split_experts_load_in_transformers(moe, tmp_path, scheme):
    out = _quantize(moe["llama4"], tmp_path / "out", "--scheme", scheme)
    got = _tensors(out)
    assert not [n for n in got if n.endswith(("gate_up_proj", "experts.down_proj"))]
    leaf = "weight_packed" if scheme == "W8A16" else "weight"
    assert f"model.layers.1.feed_forward.experts.3.down_proj.{leaf}" in got
    assert "model.layers.0.feed_forward.router" in load_config(out)["quantization_config"]["ignore"]
    want, _ = _logits(moe["llama4"])
    logits, info = _logits(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _cos(logits, want) > 0.98


def test_llama4_experts_left_dense_are_still_split(moe, tmp_path):
    # with a quantization config transformers builds Llama 4 experts as Linear modules,
    # which need the per-expert names even when they are not quantized
    out = _quantize(moe["llama4"], tmp_path / "out", "--ignore", r"re:.*feed_forward\.experts\..*")
    got = _tensors(out)
    w = got["model.layers.0.feed_forward.experts.2.up_proj.weight"]
    src = _tensors(moe["llama4"])["model.layers.0.feed_forward.experts.gate_up_proj"]
    assert torch.equal(w, src[2][:, 64:].t())
    logits, info = _logits(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _cos(logits, _logits(moe["llama4"])[0]) > 0.98
    assert main(["verify", str(out), "-q"]) == 0


def test_granite_split_experts_say_transformers_cannot_load_them(moe, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", str(moe["granitemoe"]), str(out), "-s", "FP8_DYNAMIC"]) == 0
    err = capsys.readouterr().err
    assert "cannot load GraniteMoE experts stored per expert" in err
    assert "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight" in _tensors(out)
    capsys.readouterr()
    assert main(["verify", str(out), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f for f in report["findings"] if f["check"] == "tensors.expert"]
    assert main(["eval", str(out), "-q"]) == 2
    assert loaders.GRANITE_SPLIT in capsys.readouterr().err


def test_granite_experts_left_dense_stay_fused_and_load(moe, tmp_path):
    out = _quantize(moe["granitemoe"], tmp_path / "out", "--ignore", GRANITE_EXPERTS)
    got, src = _tensors(out), _tensors(moe["granitemoe"])
    for name in ("input_linear", "output_linear"):
        t = f"model.layers.1.block_sparse_moe.{name}.weight"
        assert torch.equal(got[t], src[t])
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    logits, info = _logits(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _cos(logits, _logits(moe["granitemoe"])[0]) > 0.98
    assert main(["verify", str(out), "-q"]) == 0


@pytest.mark.parametrize("kind", ["llama4", "granitemoe"])
def test_verify_compares_split_experts_with_the_fused_source(moe, tmp_path, kind, capsys):
    out = _quantize(moe[kind], tmp_path / "out", "--scheme", "W8A8")
    capsys.readouterr()
    assert main(["verify", str(out), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    expert = [r for r in report["layers"] if ".experts.1.up_proj" in r["module"]]
    assert expert and all(r["compared_with"] == "reference" for r in expert)
    # one expert row's scale x4: only the fused source shows it
    prefix = "feed_forward" if kind == "llama4" else "block_sparse_moe"
    name = f"model.layers.1.{prefix}.experts.2.down_proj.weight_scale"
    shard = next(out.glob("*.safetensors"))
    with safe_open(shard, "pt") as h:
        ts, meta = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()
    ts[name][3] *= 4
    save_file(ts, shard, metadata=meta)
    assert main(["verify", str(out), "--no-reference", "-q"]) == 0
    assert main(["verify", str(out), "-q"]) == 1


def test_inspect_shows_fused_experts_and_their_split(moe, capsys):
    assert main(["inspect", str(moe["llama4"]), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["kinds_error"] is None
    rows = {t["name"]: t for t in body["tensors"]}
    assert rows["model.layers.0.feed_forward.experts.gate_up_proj"]["kind"] == "experts (fused)"
    plan = {t["name"]: t for t in body["plan"]["tensors"]}
    piece = plan["model.layers.0.feed_forward.experts.3.gate_proj.weight"]
    assert piece["action"] == "quantize" and "transposed" in piece["note"]


@pytest.mark.parametrize(
    ("model_type", "names"),
    [
        ("gpt_oss", {"model.layers.0.mlp.experts.gate_up_proj": (4, 64, 128)}),
        ("dbrx", {"transformer.blocks.0.ffn.experts.mlp.w1": (256, 64)}),
    ],
)
def test_unknown_fused_layouts_are_refused(tmp_path, capsys, model_type, names):
    ts = {n: torch.zeros(*s, dtype=torch.bfloat16) for n, s in names.items()}
    ts["lm_head.weight"] = torch.zeros(256, 64, dtype=torch.bfloat16)
    save_file(ts, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert main(["quantize", str(tmp_path), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "layout qcli does not know" in err and "Llama 4" in err
    assert not (tmp_path / "out").exists()
