"""MoE checkpoints in transformers: what loads, and the one limit that is the loader's own.

transformers 5.24 merges per-expert tensors into fused 3-D parameters while it loads them, and
its compressed-tensors step dequantizes fp8 and `weight_packed` experts on the way; int8
`weight` + `weight_scale` experts (W8A8) reach its Concatenate empty. qcli's checkpoint is the
layout llm-compressor writes too, so qcli says so (qcli.loaders.INT8_EXPERTS). If a later
transformers loads them, the first test fails and the message must change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qcli.cli.app import main

pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 17, 42, 99, 311, 7, 256, 3, 64, 128, 5, 200]])


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # larger than the default init, so that logits say something
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("moe") / "qwen3-moe"
    model.save_pretrained(out)
    return out


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    with torch.no_grad():
        return model(IDS).logits.float(), info


def test_int8_experts_do_not_load_in_transformers(qwen3_moe: Path, tmp_path: Path) -> None:
    import logging as stdlib_logging

    from transformers.utils import logging

    out = tmp_path / "w8a8"
    assert main(["quantize", str(qwen3_moe), str(out), "-q"]) == 0
    seen: list[str] = []
    handler = stdlib_logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    level = logging.get_verbosity()
    logging.set_verbosity_warning()  # the load report is a warning
    logging.add_handler(handler)
    try:
        with pytest.raises(RuntimeError, match="conversion of the weights"):
            _load(out)
    finally:
        logging.remove_handler(handler)
        logging.set_verbosity(level)
    # its load report names the merge that found no tensors
    report = "\n".join(seen)
    assert "Concatenate" in report and "experts.gate_up_proj" in report, report[-2000:]


def test_w8a8_with_dense_experts_does_not_load_either(qwen3_moe: Path, tmp_path: Path) -> None:
    """Under an int-quantized config transformers 5.24 routes per-expert weights through the
    same merge, dense ones too (qcli.loaders.INT8_EXPERTS says so)."""
    out = tmp_path / "w8a8-dense-experts"
    assert main(["quantize", str(qwen3_moe), str(out), "-q", "-i", r"re:.*\.experts\..*"]) == 0
    with pytest.raises(RuntimeError, match="conversion of the weights"):
        _load(out)


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W8A16"])
def test_fp8_and_packed_experts_load(qwen3_moe: Path, tmp_path: Path, scheme: str) -> None:
    out = tmp_path / scheme
    assert main(["quantize", str(qwen3_moe), str(out), "-q", "-s", scheme]) == 0
    dense, _ = _load(qwen3_moe)
    got, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    cos = torch.nn.functional.cosine_similarity(got.flatten(), dense.flatten(), dim=0).item()
    assert cos > 0.98
