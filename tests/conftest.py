"""Shared fixtures: tiny real checkpoints made with transformers (random weights, seeded); the
builders themselves are in tests/builders.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.builders import EXAMPLE, LLAMA, REPO, make_model  # noqa: E402, F401
from tests.fakehub import hub  # noqa: E402, F401  (the fake hub fixture, for every test)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny untied Llama, tied Qwen2, and a multi-shard Llama, made once per session."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_model("llama", root / "llama"),
        "qwen2": make_model("qwen2", root / "qwen2"),
        "llama-sharded": make_model("llama", root / "llama-sharded", max_shard_size="300KB"),
    }
