"""A block-FP8 release of real weights (SmolLM2-135M-Instruct: 576 = 4.5 blocks of 128, as
real releases have partial blocks), re-quantized to W8A8 and evaluated against the release
itself: the reference is the release decoded by qcli, not transformers' CPU fp8 path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qcli.cli.app import main
from tests.builders import block_fp8_release
from tests.real_models import smollm2

pytestmark = pytest.mark.slow

TOKENS = 1022  # two windows of [BOS] + 511


def _eval(capsys, out: Path) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["eval", str(out), "--json", "-q", "--max-tokens", str(TOKENS)])
    return code, json.loads(capsys.readouterr().out)


def test_release_requantized_to_w8a8_passes_eval_against_the_release(tmp_path, capsys):
    src = smollm2()
    release = tmp_path / "fp8"
    block_fp8_release(src, release)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation")):
            shutil.copy(f, release / f.name)
    out = tmp_path / "w8a8"
    assert main(["quantize", str(release), str(out), "-s", "W8A8", "-q"]) == 0
    code, body = _eval(capsys, out)
    assert code == 0, body
    assert "decoded by qcli" in body["engines"]["reference"]["loader"]
    # against the bf16 original the same run is as close: the release's own fp8 error is
    # small next to int8's (and the order of the two errors does not matter much)
    direct = tmp_path / "direct"
    assert main(["quantize", str(src), str(direct), "-s", "W8A8", "-q"]) == 0
    code, base = _eval(capsys, direct)
    assert code == 0
    assert body["kld"]["mean"] < 2 * base["kld"]["mean"] + 0.01
