"""The SmolLM2 checkpoint qcli's tests use is what transformers itself makes of the GGUF:
the same tensors, bit for bit, and the same tokens (tests/real_models.py converts it without
transformers, in seconds)."""

from __future__ import annotations

import pytest
import torch

from tests.real_models import gguf_path, smollm2

pytestmark = pytest.mark.slow


def test_smollm2_matches_transformers_own_gguf_loader() -> None:
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2()
    gguf = gguf_path()
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tok = AutoTokenizer.from_pretrained(folder)
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Alice was beginning to get very tired; in 1865, 2,024.50 naïve café 東京."
    assert (
        tok(text, add_special_tokens=False)["input_ids"]
        == ref(text, add_special_tokens=False)["input_ids"]
    )
    assert tok.bos_token_id == 1 and ours.config.tie_word_embeddings
