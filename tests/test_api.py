"""The Python API under the CLI (qcli.quantize / plan / verify): the same files and the same
JSON as the commands, typed errors carrying the CLI's exit codes; `quantize --verbose`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import qcli
from qcli.cli.app import main
from qcli.errors import InputError, OutputError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_quantize_writes_what_the_command_writes(tmp_path: Path, capsys) -> None:
    res = qcli.quantize(EXAMPLE, tmp_path / "api", scheme="FP8_DYNAMIC", lm_head=True)
    capsys.readouterr()
    cli = ["quantize", str(EXAMPLE), str(tmp_path / "cli"), "-s", "FP8_DYNAMIC", "--lm-head"]
    assert main([*cli, "--json", "-q"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert _files(tmp_path / "api") == _files(tmp_path / "cli")
    mine = res.to_json()
    for k in ("scheme", "lm_head", "counts", "quantized_modules", "bytes_in", "bytes_out"):
        assert mine[k] == body[k], k
    assert res.plan.lm_head == "quantized" and mine["bytes_written"] == body["bytes_written"]


def test_plan_is_the_dry_run(capsys) -> None:
    plan = qcli.plan(EXAMPLE, scheme="W8A16", ignore=["re:.*down_proj"])
    capsys.readouterr()
    cli = ["quantize", str(EXAMPLE), "unused", "-s", "W8A16", "-i", "re:.*down_proj"]
    assert main([*cli, "--dry-run", "--json", "-q"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert plan.to_json(detail=False)["counts"] == body["counts"]
    assert plan.to_json(detail=False)["ignore"] == body["ignore"]
    assert all(not n.endswith("down_proj") for n in plan.quantized)


def test_verify_returns_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    qcli.quantize(EXAMPLE, out, lm_head=True)
    report = qcli.verify(out, fast=True)
    assert report.ok and report.exit_code == 0 and report.layers
    # a planted fault (every scale of one layer x2) fails it, through the same call
    from safetensors.torch import load_file, save_file

    shard = next(out.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.endswith("q_proj.weight_scale"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(shard), metadata={"format": "pt"})
    bad = qcli.verify(out)
    assert not bad.ok and bad.exit_code == 1


def test_errors_are_typed_with_exit_codes(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        qcli.quantize(tmp_path / "missing", tmp_path / "out")
    assert e.value.exit_code == 2 and "missing" in str(e.value)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises((InputError, OutputError)) as e:
        qcli.quantize(EXAMPLE, tmp_path / "out", overwrite=True)
    assert "notes.txt" in str(e.value) and e.value.exit_code in (2, 3)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_verbose_prints_a_line_per_tensor_with_its_sizes(tmp_path: Path, capsys) -> None:
    assert main(["quantize", str(EXAMPLE), str(tmp_path / "out"), "--verbose"]) == 0
    err = capsys.readouterr().err
    from safetensors import safe_open

    with safe_open(str(EXAMPLE / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    for name in names:
        line = next((ln for ln in err.splitlines() if ln.startswith(f"{name}: ")), None)
        assert line is not None, name
        assert re.search(r"(quantize|copy)\b.*\d+(\.\d+)? [KMG]?B → \d+(\.\d+)? [KMG]?B", line)
    q = next(ln for ln in err.splitlines() if ln.startswith("model.layers.0.mlp.down_proj.weight"))
    assert q.startswith("model.layers.0.mlp.down_proj.weight: quantize"), q
