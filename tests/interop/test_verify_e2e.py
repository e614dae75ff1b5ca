"""`qcli verify --e2e`: transformers runs the reference and the quantized model on fixed token
ids. The example's random lm_head gives flat logits (top-1 means nothing there), so these tests
sharpen it (x20) until the reference is confident, as a trained model is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcli.cli.app import main
from tests.builders import EXAMPLE
from tests.test_verify import ZOO


@pytest.fixture(scope="module")
def sharp(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("e2e") / "src"
    shutil.copytree(EXAMPLE, src)
    t = load_file(src / "model.safetensors")
    t["lm_head.weight"] = (t["lm_head.weight"].float() * 20).to(torch.bfloat16)
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    return src


def _e2e(capsys, out: Path, src: Path) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(
        ["verify", str(out), "--reference", str(src), "--e2e", "--json", "--layers", "lm_head"]
    )
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["W8A8", "W8A16", "FP8_DYNAMIC"])
def test_e2e_correct(sharp: Path, tmp_path: Path, capsys, scheme: str) -> None:
    out = tmp_path / "out"
    assert main(["quantize", str(sharp), str(out), "--scheme", scheme, "--lm-head", "--quiet"]) == 0
    code, body = _e2e(capsys, out, sharp)
    e = body["e2e"]
    assert code == 0 and e["ok"], e
    assert e["confident_positions"] >= 10 and e["confident_top1_agreement"] >= 0.9
    assert float(e["kl"]) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("corruption", ["swapped_q_o", "layer_scales_x2", "lm_head_scale_row_x4"])
def test_e2e_catches(sharp: Path, tmp_path: Path, capsys, corruption: str) -> None:
    out = tmp_path / "out"
    assert main(["quantize", str(sharp), str(out), "--lm-head", "--quiet"]) == 0
    ZOO[corruption].make(out)
    code, body = _e2e(capsys, out, sharp)
    assert code == 1 and not body["e2e"]["ok"], body["e2e"]


@pytest.mark.slow
def test_e2e_on_flat_logits_reports_without_judging_top1(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["quantize", str(EXAMPLE), str(out), "--lm-head", "--quiet"]) == 0
    code, body = _e2e(capsys, out, EXAMPLE)
    e = body["e2e"]
    assert code == 0 and e["confident_positions"] < 10 and e["confident_top1_agreement"] is None
