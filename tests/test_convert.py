"""Executing a plan: values equal to the simple reference math, byte-identical whatever the
threads or block sizes, atomic output, --overwrite, one writer per OUT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qcli import convert as convert_mod
from qcli import layout, planner, quant
from qcli.cli.app import main
from qcli.errors import InputError, OutputError
from qcli.schemes import SCHEMES, get_scheme
from qcli.tensors import open_checkpoint
from tests.builders import EXAMPLE
from tests.builders import llama_checkpoint as _llama


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _run(src: Path, out: Path, scheme: str = "W8A8", **kw) -> convert_mod.Result:
    opts = {k: kw.pop(k) for k in ("lm_head", "ignore") if k in kw}
    plan = planner.build(
        open_checkpoint(src), planner.PlanOptions(scheme=get_scheme(scheme), **opts)
    )
    return convert_mod.convert(plan, out, sync=False, **kw)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_values_equal_reference_math(tmp_path: Path, scheme: str) -> None:
    _run(EXAMPLE, tmp_path / "out", scheme, lm_head=True)
    src, got = _tensors(EXAMPLE), _tensors(tmp_path / "out")
    kind = get_scheme(scheme).qtype
    for name, w in src.items():
        module = name.removesuffix(".weight")
        if module + ".weight_scale" not in got:
            assert torch.equal(got[name], w), name
            continue
        scale = quant.compute_scales(w, kind, w.dtype)
        q = quant.quantize_int8(w, scale) if kind == "int8" else quant.quantize_fp8(w, scale)
        assert torch.equal(got[module + ".weight_scale"], scale), name
        if get_scheme(scheme).layout.packed:
            assert torch.equal(got[module + ".weight_packed"], layout.pack_int8(q)), name
            assert got[module + ".weight_shape"].tolist() == list(w.shape)
        else:
            assert torch.equal(got[module + ".weight"].view(torch.uint8), q.view(torch.uint8)), name


def test_byte_identical_across_threads_and_blocks(tmp_path: Path, monkeypatch) -> None:
    src = _llama(tmp_path / "src")
    _run(src, tmp_path / "a", lm_head=True, workers=1, max_shard_size=30_000)
    monkeypatch.setattr(convert_mod, "BLOCK_BYTES", 1000)  # many small blocks
    monkeypatch.setattr(convert_mod, "COPY_BYTES", 777)
    _run(src, tmp_path / "b", lm_head=True, workers=4, max_shard_size=30_000)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    assert "model.safetensors.index.json" in a


def test_output_is_atomic_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        _run(EXAMPLE, out)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces a checkpoint, never a folder holding someone's other files
    with pytest.raises(OutputError, match="keep.txt"):
        _run(EXAMPLE, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"an older result")
    _run(EXAMPLE, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or lock left


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    src = _llama(
        tmp_path / "src",
        extra={"model.layers.0.mlp.up_proj.weight": torch.full((128, 64), float("nan")).bfloat16()},
    )
    with pytest.raises(InputError, match="up_proj.*non-finite"):
        _run(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_inside_source_refused(tmp_path: Path) -> None:
    src = _llama(tmp_path / "src")
    with pytest.raises(InputError, match="inside the source"):
        _run(src, src / "out")


def test_second_writer_is_refused(tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.qcli.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(OutputError, match="another qcli run"):
            _run(EXAMPLE, out)
    finally:
        os.close(fd)
    assert not out.exists()


def test_copied_files_and_provenance(tmp_path: Path) -> None:
    res = _run(EXAMPLE, tmp_path / "out", provenance={"source": {"path": "x"}, "options": {}})
    assert "generation_config.json" in res.files
    prov = json.loads((tmp_path / "out" / "qcli_provenance.json").read_text())
    assert prov["tool"] == "qcli" and prov["scheme"] == "W8A8" and prov["source"] == {"path": "x"}


def test_cli_json_and_exit_codes(tmp_path: Path, capsys) -> None:
    assert main(["quantize", str(EXAMPLE), str(tmp_path / "o"), "--json", "--lm-head"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["lm_head"] == "quantized" and body["counts"]["quantize"] == 15
    assert body["bytes_out"] < body["bytes_in"] and "model.safetensors" in body["files"]
    assert main(["quantize", str(EXAMPLE), str(tmp_path / "o")]) == 3  # exists
    assert main(["quantize", str(EXAMPLE), str(tmp_path / "p"), "--scheme", "W4"]) == 2
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "q")]) == 2
    assert main(["quantize", str(EXAMPLE), str(tmp_path / "r"), "--targets", "re:("]) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" not in err and "unknown scheme" in err and "invalid regular expression" in err
    )
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()


def test_int8_max_keeps_weights_in_range(tmp_path: Path) -> None:
    opts = planner.PlanOptions(scheme=get_scheme("W8A8"), lm_head=True, int8_max=63)
    convert_mod.convert(planner.build(open_checkpoint(EXAMPLE), opts), tmp_path / "o", sync=False)
    src, got = _tensors(EXAMPLE), _tensors(tmp_path / "o")
    w = src["model.layers.0.mlp.down_proj.weight"]
    q = got["model.layers.0.mlp.down_proj.weight"]
    assert q.abs().max().item() == 63
    scale = quant.compute_scales(w, "int8", w.dtype, qmax=63)
    assert torch.equal(q, quant.quantize_int8(w, scale, qmax=63))
    with pytest.raises(InputError, match="int8-max"):
        planner.build(
            open_checkpoint(EXAMPLE), planner.PlanOptions(scheme=get_scheme("FP8"), int8_max=63)
        )
