"""PyTorch .bin sources (torch.save's zip format): qcli.torchbin reads every tensor exactly as
torch.load(mmap=True, weights_only=True) does, quantize and verify work from them, and a
pickle that is anything but a state dict is refused without running."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcli.cli.app import main
from qcli.errors import CheckpointError
from qcli.tensors import TensorInfo, open_checkpoint, read_tensor
from qcli.torchbin import read_bin
from tests.builders import bin_model, llama_checkpoint, rewrite_bin, to_bin
from tests.fakehub import FakeHub
from tests.fakehub import qcli as hub_qcli

IDS = torch.tensor([[1, 17, 42, 99, 200, 311, 7, 5]])
LAYER = "model.layers.1.mlp.down_proj"
FAST = ["--tokens", "1,8"]


@pytest.fixture(scope="module")
def bins(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llamas saved as transformers 4 did with safe_serialization=False."""
    root = tmp_path_factory.mktemp("bin-models")
    return {
        "llama": bin_model("llama", root / "llama"),
        "tied": bin_model("llama-tied", root / "tied"),
        "sharded": bin_model("llama", root / "sharded", shards=3),
    }


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same_as_torch(infos: dict[str, TensorInfo], path: Path) -> None:
    """Every tensor read through qcli's TensorInfo equals torch.load's, dtype and bytes."""
    want = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    assert sorted(infos) == sorted(want)
    for name, info in infos.items():
        got = read_tensor(info)
        assert got.dtype == want[name].dtype and got.shape == want[name].shape, name
        assert _bytes(got) == _bytes(want[name]), name


# --- reading ------------------------------------------------------------------------------


def test_every_dtype_view_and_alias_matches_torch_load(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    emb = torch.randn(8, 4).bfloat16()
    module = torch.nn.Linear(4, 3)  # state_dict(): an OrderedDict with _metadata (BUILD)
    state = {
        **{f"lin.{k}": v for k, v in module.state_dict().items()},
        "bf16": emb,
        "tied": emb,  # the same tensor twice, as a tied head
        "rows": base[2:4],  # a contiguous view: offset into a larger storage
        "base": base,
        "f16": torch.randn(3, 5).half(),
        "f64": torch.randn(2).double(),
        "i8": torch.randint(-128, 127, (4, 4), dtype=torch.int8),
        "i64": torch.arange(5),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "u16": torch.tensor([1, 2, 60000], dtype=torch.int32).to(
            torch.uint16
        ),  # a "new" dtype: _rebuild_tensor_v3
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "fp8_e5m2": torch.randn(2, 2).to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "column": torch.randn(5, 1),  # size-1 dims may carry any stride
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    meta, infos = read_bin(path)
    assert meta == {}
    _same_as_torch(infos, path)
    assert infos["tied"].start == infos["bf16"].start  # one copy of the bytes
    assert infos["rows"].start == infos["base"].start + 2 * 4 * 4
    assert infos["fp8"].dtype == "F8_E4M3" and infos["u16"].dtype == "U16"


def test_transformers_style_bins_match_torch_load(bins) -> None:
    for kind in ("llama", "tied"):
        ck = open_checkpoint(bins[kind])
        assert not ck.sharded and [f.name for f in ck.files] == ["pytorch_model.bin"]
        _same_as_torch(ck.tensors, bins[kind] / "pytorch_model.bin")
    ck = open_checkpoint(bins["sharded"])
    assert ck.sharded and len(ck.files) == 3 and not ck.warnings
    wmap = json.loads((bins["sharded"] / "pytorch_model.bin.index.json").read_text())
    assert {n: t.file.name for n, t in ck.tensors.items()} == wmap["weight_map"]
    for f in ck.files:
        _same_as_torch({n: t for n, t in ck.tensors.items() if t.file == f}, f)


def test_tied_weights_share_their_bytes(bins) -> None:
    t = open_checkpoint(bins["tied"]).tensors
    assert t["lm_head.weight"].start == t["model.embed_tokens.weight"].start


def test_safetensors_win_and_other_bins_are_not_weights(tmp_path: Path) -> None:
    src = llama_checkpoint(tmp_path / "m")
    (src / "pytorch_model.bin").write_bytes(b"never read")  # transformers prefers safetensors
    ck = open_checkpoint(src)
    assert [f.name for f in ck.files] == ["model.safetensors"]
    to_bin(src)
    (src / "training_args.bin").write_bytes(_evil(2))  # a Trainer's pickle: not weights
    ck = open_checkpoint(src)
    assert [f.name for f in ck.files] == ["pytorch_model.bin"]


def test_index_leaving_a_shard_out_is_said(bins, tmp_path: Path) -> None:
    src = shutil.copytree(bins["sharded"], tmp_path / "s")
    shutil.copy(src / "pytorch_model-00001-of-00003.bin", src / "pytorch_model-extra.bin")
    ck = open_checkpoint(src)
    assert any("pytorch_model-extra.bin is not named in" in w for w in ck.warnings)


# --- quantize, load, verify -----------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(bins, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bin-quantized")
    made = {}
    for kind, extra in (("llama", []), ("sharded", []), ("tied", ["--lm-head"])):
        out = root / kind
        assert main(["quantize", str(bins[kind]), str(out), "--quiet", *extra]) == 0
        made[kind] = out
    return made


@pytest.mark.parametrize("kind", ["llama", "sharded", "tied"])
def test_transformers_loads_the_output(bins, quantized, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    out = quantized[kind]
    assert sorted(p.name for p in out.glob("*.bin")) == []  # the output stays safetensors
    model, info = AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    dense = AutoModelForCausalLM.from_pretrained(bins[kind], dtype=torch.float32)
    with torch.no_grad():
        got, want = model(IDS).logits[0], dense(IDS).logits[0]
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.98, cos


def _verify(capsys, out: Path, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["verify", str(out), "--json", *FAST, *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}


def test_verify_against_the_bin_source_catches_a_planted_fault(
    bins, quantized, tmp_path: Path, capsys
) -> None:
    code, body = _verify(capsys, quantized["llama"], "--reference", str(bins["llama"]))
    assert code == 0 and body["compared_with"] == "reference", body
    out = shutil.copytree(quantized["llama"], tmp_path / "out")
    name = f"{LAYER}.weight_scale"
    tensors = load_file(out / "model.safetensors")
    tensors[name][5] *= 4  # one row's scale x4: a valid checkpoint of another weight
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    code, body = _verify(capsys, out, "--reference", str(bins["llama"]))
    assert code == 1 and body["summary"]["failed_layers"] == [LAYER], body["summary"]
    code, body = _verify(capsys, quantized["sharded"], "--reference", str(bins["sharded"]))
    assert code == 0, body


@pytest.mark.parametrize("what", ["single", "sharded", "dry-run"])
def test_inspect_reads_bins_without_torch(bins, tmp_path: Path, what: str) -> None:
    args = {
        "single": ["inspect", str(bins["llama"])],
        "sharded": ["inspect", str(bins["sharded"]), "--lm-head"],
        "dry-run": ["quantize", str(bins["tied"]), str(tmp_path / "o"), "--dry-run"],
    }[what]
    code = (
        "import sys; from qcli.cli import main; rc = main(sys.argv[1:]);"
        " heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers',"
        " 'safetensors', 'numpy'}); print(rc, heavy)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout + r.stderr


# --- refusals ---------------------------------------------------------------------------------


class _Payload:
    """What an attacker pickles: unpickling it calls `fn(arg)`."""

    def __init__(self, fn, arg: str):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _evil(protocol: int, marker: Path | None = None, fn=os.system) -> bytes:
    cmd = f"touch {marker}" if marker else "true"
    return pickle.dumps({"model.embed_tokens.weight": _Payload(fn, cmd)}, protocol=protocol)


def _bin_src(tmp: Path) -> Path:
    return to_bin(llama_checkpoint(tmp / "src"))


def _refused(capsys, src: Path, tmp: Path, *needles: str) -> str:
    capsys.readouterr()
    assert main(["quantize", str(src), str(tmp / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (tmp / "out").exists()
    return lines[0]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, capsys, protocol) -> None:
    src = _bin_src(tmp_path)
    marker = tmp_path / "pwned"
    rewrite_bin(src / "pytorch_model.bin", pickle=_evil(protocol, marker))
    # torch refuses it too, and does not run it either (the opcodes of protocols 0 and 4 it
    # refuses before it reaches the global; torch.save writes protocol 2)
    with pytest.raises(pickle.UnpicklingError, match="posix.system" if protocol == 2 else None):
        torch.load(src / "pytorch_model.bin", weights_only=True)
    line = _refused(capsys, src, tmp_path, "pytorch_model.bin", "posix.system", "never unpickles")
    assert "refused" in line
    assert main(["inspect", str(src)]) == 2
    assert not marker.exists()


@pytest.mark.parametrize(
    ("fn", "shown"), [(eval, "__builtin__.eval"), (exec, "__builtin__.exec"), (getattr, "getattr")]
)
def test_any_other_global_is_refused(tmp_path: Path, fn, shown: str) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, path)
    rewrite_bin(path, pickle=_evil(2, tmp_path / "pwned", fn))
    with pytest.raises(CheckpointError, match=f"refused.*{shown}"):
        read_bin(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "build",
    [
        b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x02\x00\x00\x00fnNs\x86b.",  # slot state
        b"ctorch\nfloat32\nN}X\x04\x00\x00\x00kindNs\x86b.",
        b"ctorch\nfloat32\n}X\x04\x00\x00\x00kindNsb.",  # a __dict__ update
    ],
    ids=["function", "dtype-slots", "dtype-dict"],
)
def test_pickle_cannot_rewrite_what_it_is_given(tmp_path: Path, build: bytes) -> None:
    """BUILD on an allowed global (to change a stand-in for later loads, say) fails: what
    the unpickler hands out is immutable."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, path)
    rewrite_bin(path, pickle=b"\x80\x02" + build)
    with pytest.raises(CheckpointError, match="not a readable state dict"):
        read_bin(path)
    torch.save({"w": torch.ones(3), "h": torch.ones(2).half()}, path)
    _same_as_torch(read_bin(path)[1], path)


def test_legacy_format_says_how_to_resave(tmp_path: Path, capsys) -> None:
    src = _bin_src(tmp_path)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _refused(capsys, src, tmp_path, "pytorch_model.bin", "legacy", "torch.save(torch.load(")


def test_compressed_storage_is_refused(tmp_path: Path, capsys) -> None:
    src = _bin_src(tmp_path)
    rewrite_bin(src / "pytorch_model.bin", compress=True)
    _refused(capsys, src, tmp_path, "pytorch_model.bin", "compressed")


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        ({"w": torch.randn(4, 6)[:, ::2]}, "strided view"),
        ({"w": torch.randn(4, 6).t()}, "strided view"),
        ({"w": torch.zeros(2, dtype=torch.complex64)}, "ComplexFloat"),
        ({"w": torch.zeros(2), "step": 3}, "'step' is a int, not a tensor"),
        ({"model": {"w": torch.zeros(2)}}, "'model' is a dict, not a tensor"),
        (torch.zeros(2), "one tensor, not a state dict"),
        ([torch.zeros(2)], "a list, not a state dict"),
    ],
    ids=["sliced-columns", "transposed", "complex", "not-a-tensor", "nested", "tensor", "list"],
)
def test_what_is_not_a_flat_dense_state_dict(tmp_path: Path, state, needle: str) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as e:
        read_bin(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid zip"):
        read_bin(path)
    path.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_bin(path)
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="no single data.pkl"):
        read_bin(path)


# --- hub sources ------------------------------------------------------------------------------


def test_hub_bins_fetched_only_without_safetensors(
    hub: FakeHub,
    bins,
    tmp_path: Path,
) -> None:
    both = shutil.copytree(bins["llama"], tmp_path / "both")
    save_file(_unshared(both / "pytorch_model.bin"), both / "model.safetensors")
    hub.add("org/bin", bins["llama"])
    hub.add("org/both", both)
    home = tmp_path / "hf"
    r = hub_qcli(hub, home, "quantize", "org/bin", str(tmp_path / "o1"), "-q")
    assert r.returncode == 0, r.stderr
    assert any(s.path.endswith("/pytorch_model.bin") for s in hub.log)
    hub.log.clear()
    r = hub_qcli(hub, home, "quantize", "org/both", str(tmp_path / "o2"), "-q")
    assert r.returncode == 0, r.stderr
    assert not [s for s in hub.log if s.path.endswith(".bin")]
    # offline, the cached .bin snapshot serves again with no request at all
    hub.log.clear()
    r = hub_qcli(hub, home, "quantize", "org/bin", str(tmp_path / "o3"), "-q", offline=True)
    assert r.returncode == 0, r.stderr
    assert hub.log == []
    o1, o3 = tmp_path / "o1", tmp_path / "o3"
    assert (o1 / "model.safetensors").read_bytes() == (o3 / "model.safetensors").read_bytes()


def _unshared(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {k: v.clone() for k, v in state.items()}  # safetensors refuses shared storage
