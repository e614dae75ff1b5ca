"""Header parsing and the positional shard writer, checked against the safetensors library."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qcli.errors import CheckpointError
from qcli.shards import ShardWriter, Slot, index_json
from qcli.tensors import (
    natural_key,
    open_checkpoint,
    read_header,
    read_rows,
    read_tensor,
)


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "b.weight": torch.randint(-128, 127, (3, 9), dtype=torch.int8, generator=g),
        "c.scale": torch.rand(3, 1, generator=g),
        "d.f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "e.shape": torch.tensor([3, 9], dtype=torch.int64),
        "f.empty": torch.empty(0, 4, dtype=torch.float16),
        "g.scalar": torch.tensor(2.5),
    }


def test_read_header_matches_safetensors(tmp_path: Path) -> None:
    ts = _sample()
    save_file(ts, tmp_path / "x.safetensors", metadata={"format": "pt"})
    meta, infos = read_header(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    assert set(infos) == set(ts)
    for name, t in ts.items():
        got = read_tensor(infos[name])
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(_bytes(got), _bytes(t))


def test_read_rows(tmp_path: Path) -> None:
    t = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    save_file({"w": t}, tmp_path / "x.safetensors")
    _, infos = read_header(tmp_path / "x.safetensors")
    assert torch.equal(read_rows(infos["w"], None, 3, 7), t[3:7])


@pytest.mark.parametrize("reverse", [False, True])
def test_writer_output_reads_back_and_is_order_independent(tmp_path: Path, reverse: bool) -> None:
    ts = _sample()
    slots = [Slot(n, _st(t), tuple(t.shape)) for n, t in ts.items()]
    path = tmp_path / f"out{reverse}.safetensors"
    w = ShardWriter(path, slots, {"format": "pt"})
    for name in sorted(ts, reverse=reverse):
        w.write(name, ts[name])
    w.close()
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in ts.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(_bytes(got), _bytes(t))
    other = tmp_path / f"out{not reverse}.safetensors"
    w = ShardWriter(other, slots, {"format": "pt"})
    for name in sorted(ts, reverse=not reverse):
        w.write(name, ts[name])
    w.close()
    assert path.read_bytes() == other.read_bytes()


def test_writer_blocks_in_any_order(tmp_path: Path) -> None:
    t = torch.arange(40, dtype=torch.int8).reshape(8, 5)
    w = ShardWriter(tmp_path / "x.safetensors", [Slot("t", "I8", (8, 5))], {"format": "pt"})
    for r0 in (6, 0, 2, 4):
        w.write_at("t", r0 * 5, t[r0 : r0 + 2])
    w.done("t")
    w.close()
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def test_writer_refuses_wrong_shape_and_missing(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "x.safetensors", [Slot("t", "F32", (2, 2))], {"format": "pt"})
    with pytest.raises(ValueError, match="planned"):
        w.write("t", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _st(t: torch.Tensor) -> str:
    from qcli.tensors import TORCH_TO_ST

    return TORCH_TO_ST[str(t.dtype).removeprefix("torch.")]


def _raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"t": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_bad_headers(tmp_path: Path, header, data: bytes, message: str) -> None:
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_header_length_and_json_errors(tmp_path: Path) -> None:
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(p)
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(p)


def test_open_checkpoint_index_and_errors(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "s2.safetensors")
    (tmp_path / "config.json").write_text("{}")
    idx = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    ck = open_checkpoint(tmp_path)
    assert list(ck.tensors) == ["a", "b"] and ck.sharded
    idx["weight_map"]["c"] = "s2.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="lacks it"):
        open_checkpoint(tmp_path)
    idx["weight_map"] = {"a": "s3.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "s2.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="appears in both"):
        open_checkpoint(tmp_path)


def test_only_bin_weights_and_no_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_index_json_is_sorted_naturally() -> None:
    body = json.loads(index_json({"layers.10.w": "b", "layers.9.w": "a"}, 10))
    assert list(body["weight_map"]) == ["layers.9.w", "layers.10.w"]
    assert body["metadata"]["total_size"] == 10
    assert natural_key("x.2") < natural_key("x.10")
