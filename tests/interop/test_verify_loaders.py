"""The consequences verify's findings name are real: transformers, handed each planted
corruption, computes garbage, NaN, or refuses to load, while the correct output matches the
source. (vLLM's side of each finding is its documented rule, checked in scripts/.)"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch

from qcli.cli.app import main
from tests.builders import EXAMPLE
from tests.test_verify import ZOO

IDS = torch.tensor([[1, 17, 42, 99, 311, 7, 256, 3, 64, 128, 5, 200]])

# corruption -> what transformers does with it
CONSEQUENCES = {
    "status_removed": "garbage",  # int8 values read as floats
    "quantization_config_removed": "garbage",
    "lm_head_scale_removed": "degraded",  # uninitialized scale: NaN or garbage, run to run
    "nan_scale": "nan",
    "dense_not_ignored": "degraded",  # garbage or NaN, run to run
    "scale_1d": "fails",
    "lm_head_ignored_but_int8": "fails",
    "unknown_arg_key": "fails",
}


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            return model(IDS).logits[0]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.fixture(scope="module")
def correct(tmp_path_factory) -> tuple[Path, torch.Tensor, float]:
    out = tmp_path_factory.mktemp("loaders") / "W8A8"
    assert main(["quantize", str(EXAMPLE), str(out), "--lm-head", "--quiet"]) == 0
    ref = _logits(EXAMPLE)
    return out, ref, _cos(_logits(out), ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONSEQUENCES))
def test_flagged_corruption_breaks_transformers(correct, tmp_path: Path, name: str) -> None:
    good, ref, good_cos = correct
    assert good_cos > 0.999
    out = tmp_path / "out"
    shutil.copytree(good, out)
    ZOO[name].make(out)
    assert main(["verify", str(out), "--quiet", "--layers", "lm_head"]) == 1
    expected = CONSEQUENCES[name]
    if expected == "fails":
        with pytest.raises(Exception):  # noqa: B017  (transformers raises several types)
            _logits(out)
        return
    got = _logits(out)
    if expected == "nan":
        assert torch.isnan(got).any()
    elif expected == "garbage":
        assert _cos(got, ref) < 0.5
    else:  # an uninitialized scale: sometimes NaN, always off
        assert torch.isnan(got).any() or _cos(got, ref) < good_cos - 0.01
