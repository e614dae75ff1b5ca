"""Shared fixtures: tiny real checkpoints made with transformers (random weights, seeded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama"

LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=256,
)


def make_model(kind: str, dest: Path, *, max_shard_size: str | None = None, seed: int = 0) -> Path:
    """Save a tiny random model of `kind` ("llama", "qwen2" (tied)) with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(**LLAMA, tie_word_embeddings=False)
    elif kind == "llama-tied":
        cfg = LlamaConfig(**LLAMA, tie_word_embeddings=True)
    elif kind == "qwen2":
        cfg = Qwen2Config(**LLAMA, tie_word_embeddings=True)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dest, **kwargs)
    return dest


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny untied Llama, tied Qwen2, and a multi-shard Llama, made once per session."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_model("llama", root / "llama"),
        "qwen2": make_model("qwen2", root / "qwen2"),
        "llama-sharded": make_model("llama", root / "llama-sharded", max_shard_size="300KB"),
    }


def load_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
