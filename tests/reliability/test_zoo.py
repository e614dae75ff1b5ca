"""The bad-input zoo: every case fails cleanly.

Each case builds a source (and sometimes an OUT) under tmp_path, runs `qcli quantize` in this
process, and checks the whole contract at once: a non-zero exit of the documented kind, exactly
one line on stderr that names the problem (file, tensor or option), no traceback, and the tree
under tmp_path byte-for-byte what it was before the run — so the input is unchanged and nothing
(OUT, a temporary folder, a lock, a created parent folder) was left behind.

Cases that need a real process (signals, RLIMIT_FSIZE, two runs at once) are in
test_processes.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qcli import planner, sharding
from qcli.errors import EXIT_BAD_INPUT, EXIT_OUTPUT_FAILED
from qcli.schemes import get_scheme
from qcli.tensors import INDEX_NAME, open_checkpoint
from tests.builders import H, I
from tests.builders import llama_checkpoint as _llama
from tests.reliability.util import (
    assert_one_line_error,
    read_raw,
    rewrite_header,
    run_cli,
    tree_state,
    write_raw,
)
from tests.zoo import Case, Zoo

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
SHARD = "model.safetensors"


ZOO = Zoo()
case = ZOO.case  # @case(exit code, *needles the one error line must hold)


def _src(tmp: Path, **kw) -> Path:
    return _llama(tmp / "src", **kw)


def _sharded(tmp: Path) -> Path:
    """The same model in two shards with an index, as transformers writes it."""
    src = _src(tmp)
    header, _ = read_raw(src / SHARD)
    names = sorted(k for k in header if k != "__metadata__")
    from safetensors.torch import load_file

    tensors = load_file(src / SHARD)
    (src / SHARD).unlink()
    half = len(names) // 2
    wmap = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, src / fname, metadata={"format": "pt"})
        wmap.update(dict.fromkeys(part, fname))
    (src / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return src


def _out(tmp: Path) -> Path:
    return tmp / "out"


# --- SRC ---------------------------------------------------------------------------------


@case(EXIT_BAD_INPUT, "models/qwen2-tyed: no such folder", "did you mean")
def source_typo_under_a_local_folder(tmp: Path):
    # `models/` exists here, so `models/qwen2-tyed` is a path with a typo, not a hub repo
    (tmp / "models").mkdir()
    _llama(tmp / "models" / "qwen2-tied")
    os.chdir(tmp)
    return "models/qwen2-tyed", _out(tmp), []


@case(EXIT_BAD_INPUT, "./nowhere/model: no such folder")
def source_dot_path_missing(tmp: Path):
    os.chdir(tmp)
    return "./nowhere/model", _out(tmp), []


@case(EXIT_BAD_INPUT, "SRC is empty")
def source_argument_empty(tmp: Path):
    return "", _out(tmp), []


# --- broken safetensors files -------------------------------------------------------------


@case(EXIT_BAD_INPUT, SHARD, "truncated")
def truncated_shard(tmp: Path):
    src = _src(tmp)
    blob = (src / SHARD).read_bytes()
    (src / SHARD).write_bytes(blob[: len(blob) // 2])
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "truncated file")
def truncated_before_header(tmp: Path):
    src = _src(tmp)
    (src / SHARD).write_bytes(b"\x10\x00\x00")
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "not valid JSON")
def header_json_broken(tmp: Path):
    src = _src(tmp)
    blob = bytearray((src / SHARD).read_bytes())
    blob[8 + 20 : 8 + 24] = b'"}{,'  # same length: only the JSON is wrong
    (src / SHARD).write_bytes(bytes(blob))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "not valid JSON")
def header_not_utf8(tmp: Path):
    src = _src(tmp)
    header, data = read_raw(src / SHARD)
    raw = json.dumps(header).encode().replace(b"model", b"mod\xffl", 1)
    write_raw(src / SHARD, raw, data)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "header length field says 9223372036854775808")
def header_length_huge(tmp: Path):
    src = _src(tmp)
    header, data = read_raw(src / SHARD)
    write_raw(src / SHARD, header, data, hlen=2**63)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "header is not a JSON object")
def header_not_an_object(tmp: Path):
    src = _src(tmp)
    write_raw(src / SHARD, [1, 2, 3])
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "nested too deeply")
def header_nested_too_deeply(tmp: Path):
    src = _src(tmp)
    write_raw(src / SHARD, b"[" * 50_000 + b"]" * 50_000)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "src", "holds no tensors")
def header_without_tensors(tmp: Path):
    src = _src(tmp)
    write_raw(src / SHARD, {"__metadata__": {"format": "pt"}})
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "overlap", "model.layers.0.self_attn.k_proj.weight")
def offsets_overlapping(tmp: Path):
    src = _src(tmp)
    k = "model.layers.0.self_attn.k_proj.weight"

    def edit(h: dict) -> None:
        h[k]["data_offsets"] = list(h[Q]["data_offsets"])  # same size: only the place is wrong

    rewrite_header(src / SHARD, edit)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, Q, "truncated")
def offsets_past_the_end(tmp: Path):
    src = _src(tmp)

    def edit(h: dict) -> None:
        end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        n = H * H * 2
        h[Q]["data_offsets"] = [end + 64, end + 64 + n]

    rewrite_header(src / SHARD, edit)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, Q, "bad data_offsets")
def offsets_reversed(tmp: Path):
    src = _src(tmp)
    rewrite_header(src / SHARD, lambda h: h[Q].update(data_offsets=h[Q]["data_offsets"][::-1]))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, Q, "F32", "needs")
def dtype_disagrees_with_bytes(tmp: Path):
    src = _src(tmp)
    rewrite_header(src / SHARD, lambda h: h[Q].update(dtype="F32"))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, Q, "needs")
def shape_disagrees_with_bytes(tmp: Path):
    src = _src(tmp)
    rewrite_header(src / SHARD, lambda h: h[Q].update(shape=[H, H + 1]))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, Q, "unknown dtype 'Q4_K'")
def unknown_dtype(tmp: Path):
    src = _src(tmp)
    rewrite_header(src / SHARD, lambda h: h[Q].update(dtype="Q4_K"))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, Q, "bad shape")
def negative_shape(tmp: Path):
    src = _src(tmp)
    rewrite_header(src / SHARD, lambda h: h[Q].update(shape=[-H, -H]))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "not a regular file")
def shard_is_a_folder(tmp: Path):
    src = _src(tmp)
    (src / SHARD).unlink()
    (src / SHARD).mkdir()
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "bad\\nshard.safetensors", "truncated file")
def broken_shard_with_a_newline_in_its_name(tmp: Path):
    # the message names the file, escaped: a newline in a name must not break the one line
    src = _src(tmp)
    (src / "bad\nshard.safetensors").write_bytes(b"\x00")
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, SHARD, "not a regular file")
def shard_is_a_fifo(tmp: Path):
    # opening a FIFO for reading blocks until a writer comes: it must be refused, not opened
    src = _src(tmp)
    (src / SHARD).unlink()
    os.mkfifo(src / SHARD)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "config.json", "not a regular file")
def config_is_a_fifo(tmp: Path):
    src = _src(tmp)
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    return src, _out(tmp), []


# --- sharded checkpoints and their index --------------------------------------------------


@case(EXIT_BAD_INPUT, INDEX_NAME, "model-00003-of-00003.safetensors", "missing")
def index_names_missing_shard(tmp: Path):
    src = _sharded(tmp)
    idx = json.loads((src / INDEX_NAME).read_text())
    idx["weight_map"][Q] = "model-00003-of-00003.safetensors"
    (src / INDEX_NAME).write_text(json.dumps(idx))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, INDEX_NAME, "model.layers.0.mlp.extra_proj.weight", "lacks it")
def index_names_tensor_missing_from_shard(tmp: Path):
    src = _sharded(tmp)
    idx = json.loads((src / INDEX_NAME).read_text())
    idx["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = "model-00001-of-00002.safetensors"
    (src / INDEX_NAME).write_text(json.dumps(idx))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, INDEX_NAME, "'../outside.safetensors'", "not a file name")
def index_points_outside_the_folder(tmp: Path):
    src = _sharded(tmp)
    idx = json.loads((src / INDEX_NAME).read_text())
    shutil.copy(src / "model-00001-of-00002.safetensors", tmp / "outside.safetensors")
    idx["weight_map"] = {
        k: "../outside.safetensors" if v.startswith("model-00001") else v
        for k, v in idx["weight_map"].items()
    }
    (src / INDEX_NAME).write_text(json.dumps(idx))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, INDEX_NAME, "'/etc/hostname'", "not a file name")
def index_names_an_absolute_path(tmp: Path):
    src = _sharded(tmp)
    idx = json.loads((src / INDEX_NAME).read_text())
    idx["weight_map"][Q] = "/etc/hostname"
    (src / INDEX_NAME).write_text(json.dumps(idx))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, INDEX_NAME, "not valid JSON")
def index_json_broken(tmp: Path):
    src = _sharded(tmp)
    (src / INDEX_NAME).write_text('{"weight_map": {')
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, INDEX_NAME, "weight_map")
def index_without_weight_map(tmp: Path):
    src = _sharded(tmp)
    (src / INDEX_NAME).write_text(json.dumps({"weight_map": ["model-00001-of-00002"]}))
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "model.norm.weight", "model-00001-of-00002", "model-00002-of-00002")
def duplicate_tensor_across_shards(tmp: Path):
    src = _sharded(tmp)
    (src / INDEX_NAME).unlink()  # without an index, every shard is read: the names clash
    f1, f2 = (src / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    from safetensors.torch import load_file

    t2 = load_file(f2)
    t1 = load_file(f1)
    name = "model.norm.weight"
    (t1 if name not in t1 else t2)[name] = torch.ones(H).bfloat16()
    save_file(t1, f1, metadata={"format": "pt"})
    save_file(t2, f2, metadata={"format": "pt"})
    return src, _out(tmp), []


# --- config.json and the folder itself ----------------------------------------------------


@case(EXIT_BAD_INPUT, "no config.json")
def config_missing(tmp: Path):
    src = _src(tmp)
    (src / "config.json").unlink()
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "config.json", "not valid JSON")
def config_broken(tmp: Path):
    src = _src(tmp)
    (src / "config.json").write_text('{"model_type": "llama",')
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "config.json", "not a JSON object")
def config_not_an_object(tmp: Path):
    src = _src(tmp)
    (src / "config.json").write_text('["llama"]')
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "config.json", "'model_type'", "expected a string")
def config_model_type_not_a_string(tmp: Path):
    return _src(tmp, cfg={"model_type": ["llama"]}), _out(tmp), []


@case(EXIT_BAD_INPUT, "config.json text_config", "'tie_word_embeddings'", "true or false")
def config_tie_flag_not_a_boolean(tmp: Path):
    # bool("no") is True: a string here must be refused, not read as "tied"
    return _src(tmp, cfg={"text_config": {"tie_word_embeddings": "no"}}), _out(tmp), []


@case(EXIT_BAD_INPUT, "config.json", "nested too deeply")
def config_nested_too_deeply(tmp: Path):
    src = _src(tmp)
    (src / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "no *.safetensors weights")
def no_weights(tmp: Path):
    src = _src(tmp)
    (src / SHARD).unlink()
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "model.bin", "reads safetensors", "pytorch_model.bin")
def only_bin_weights(tmp: Path):
    # pytorch_model.bin is read (tests/test_bin.py); a .bin by another name is not weights
    # transformers would load
    src = _src(tmp)
    (src / SHARD).unlink()
    torch.save({Q: torch.zeros(2, 2)}, src / "model.bin")
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "no such folder")
def source_does_not_exist(tmp: Path):
    return tmp / "no" / "such" / "model", _out(tmp), []


@case(EXIT_BAD_INPUT, "not a folder")
def source_is_a_file(tmp: Path):
    src = _src(tmp)
    return src / SHARD, _out(tmp), []


@case(EXIT_BAD_INPUT, "qcli-nonexistent-org/no-such-model", "local cache")
def hub_repo_missing_offline(tmp: Path):
    return "qcli-nonexistent-org/no-such-model", _out(tmp), []


# --- weights qcli must refuse -------------------------------------------------------------


@case(EXIT_BAD_INPUT, UP, "non-finite", "nan")
def nan_in_a_weight(tmp: Path):
    w = torch.randn(I, H).bfloat16()
    w[7, 3] = float("nan")
    return _src(tmp, extra={UP: w}), _out(tmp), []


@case(EXIT_BAD_INPUT, UP, "non-finite", "inf")
def inf_in_a_weight(tmp: Path):
    w = torch.randn(I, H).bfloat16()
    w[100, 0] = float("-inf")
    return _src(tmp, extra={UP: w}), _out(tmp), []


@case(EXIT_BAD_INPUT, UP, "I32", "float")
def integer_weight(tmp: Path):
    return _src(tmp, extra={UP: torch.ones(I, H, dtype=torch.int32)}), _out(tmp), []


@case(EXIT_BAD_INPUT, UP, "BOOL", "float")
def bool_weight(tmp: Path):
    return _src(tmp, extra={UP: torch.ones(I, H, dtype=torch.bool)}), _out(tmp), []


@case(EXIT_BAD_INPUT, "already quantized", "compressed-tensors")
def already_quantized_config(tmp: Path):
    cfg = {"quantization_config": {"quant_method": "compressed-tensors"}}
    return _src(tmp, cfg=cfg), _out(tmp), []


@case(EXIT_BAD_INPUT, "already quantized", "up_proj.weight_scale")
def already_quantized_tensors(tmp: Path):
    extra = {"model.layers.0.mlp.up_proj.weight_scale": torch.ones(I, 1).bfloat16()}
    return _src(tmp, extra=extra), _out(tmp), []


@case(EXIT_BAD_INPUT, "already quantized", UP, "F8_E4M3")
def already_quantized_fp8_weight(tmp: Path):
    return _src(tmp, extra={UP: torch.zeros(I, H, dtype=torch.float8_e4m3fn)}), _out(tmp), []


FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


def _fp8_up(scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    extra = {UP: torch.zeros(I, H, dtype=torch.float8_e4m3fn)}
    if scale is not None:
        extra[UP.removesuffix("weight") + "weight_scale_inv"] = scale
    return extra


@case(EXIT_BAD_INPUT, UP, "no weight_scale_inv")
def block_fp8_weight_without_its_scale(tmp: Path):
    cfg = {"quantization_config": FP8_BLOCK}
    return _src(tmp, cfg=cfg, extra=_fp8_up(None)), _out(tmp), []


@case(EXIT_BAD_INPUT, "up_proj.weight_scale_inv", "F32[2, 2]", "need float [1, 1]")
def block_fp8_scale_of_another_shape(tmp: Path):
    cfg = {"quantization_config": FP8_BLOCK}
    return _src(tmp, cfg=cfg, extra=_fp8_up(torch.ones(2, 2))), _out(tmp), []


@case(EXIT_BAD_INPUT, "already quantized with fp8", "weight_block_size None")
def per_tensor_fp8_release(tmp: Path):
    # the older per-tensor `quant_method: fp8` layout: not a block release qcli decodes
    cfg = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}
    return _src(tmp, cfg=cfg, extra=_fp8_up(torch.ones(1, 1))), _out(tmp), []


@case(EXIT_BAD_INPUT, "already quantized with 'gptq'", "re-quantizes block-fp8")
def another_tools_quantization(tmp: Path):
    cfg = {"quantization_config": {"quant_method": "gptq", "bits": 4}}
    return _src(tmp, cfg=cfg), _out(tmp), []


@case(EXIT_BAD_INPUT, "up_proj.weight_shape", "twice")
def output_name_collides_with_a_source_tensor(tmp: Path):
    # W8A16 writes `M.weight_shape`; a source tensor of that name must not be overwritten
    extra = {"model.layers.0.mlp.up_proj.weight_shape": torch.tensor([I, H])}
    return _src(tmp, extra=extra), _out(tmp), ["--scheme", "W8A16"]


# --- options ------------------------------------------------------------------------------


@case(EXIT_BAD_INPUT, "invalid regular expression", "re:.*(proj")
def invalid_regex(tmp: Path):
    return _src(tmp), _out(tmp), ["--targets", "re:.*(proj"]


@case(EXIT_BAD_INPUT, "invalid regular expression", "re:[/x](")
def invalid_regex_looking_like_markup(tmp: Path):
    return _src(tmp), _out(tmp), ["--ignore", "re:[/x]("]


@case(EXIT_BAD_INPUT, "unknown scheme", "W4A16")
def unknown_scheme(tmp: Path):
    return _src(tmp), _out(tmp), ["--scheme", "W4A16"]


@case(EXIT_BAD_INPUT, "target 'model.layers.0.self_attn.qproj'", "matches no module")
def target_matches_nothing(tmp: Path):
    return _src(tmp), _out(tmp), ["-t", "Linear", "-t", "model.layers.0.self_attn.qproj"]


@case(EXIT_BAD_INPUT, "ignore entry 're:.*dwn_proj'", "matches no")
def ignore_matches_nothing(tmp: Path):
    return _src(tmp), _out(tmp), ["--ignore", "re:.*dwn_proj"]


@case(EXIT_BAD_INPUT, "vLLM fuses", "q_proj", "k_proj")
def split_fused_group(tmp: Path):
    return _src(tmp), _out(tmp), ["--ignore", "model.layers.0.self_attn.k_proj"]


@case(EXIT_BAD_INPUT, "empty")
def empty_target(tmp: Path):
    return _src(tmp), _out(tmp), ["--targets", " "]


@case(EXIT_BAD_INPUT, "5XB")
def bad_max_shard_size(tmp: Path):
    return _src(tmp), _out(tmp), ["--max-shard-size", "5XB"]


@case(EXIT_BAD_INPUT, "down_proj", "multiple of 4")
def packing_needs_multiple_of_four(tmp: Path):
    i = 130
    extra = {
        "model.layers.0.mlp.gate_proj.weight": torch.randn(i, H).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(i, H).bfloat16(),
        "model.layers.0.mlp.down_proj.weight": torch.randn(H, i).bfloat16(),
    }
    return _src(tmp, extra=extra, cfg={"intermediate_size": i}), _out(tmp), ["-s", "W8A16"]


# --- OUT ----------------------------------------------------------------------------------


@case(EXIT_OUTPUT_FAILED, "already exists", "--overwrite")
def output_exists(tmp: Path):
    out = _out(tmp)
    out.mkdir()
    (out / "config.json").write_text("{}")  # someone's earlier result: must survive
    return _src(tmp), out, []


@case(EXIT_BAD_INPUT, UP, "non-finite")
def output_exists_overwrite_but_input_fails(tmp: Path):
    # --overwrite replaces OUT only with a finished result: a failed run keeps the old one
    out = _out(tmp)
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous result")
    w = torch.randn(I, H).bfloat16()
    w[-1, -1] = float("nan")
    return _src(tmp, extra={UP: w}), out, ["--overwrite"]


@case(EXIT_OUTPUT_FAILED, "--overwrite would delete", "notes.txt")
def overwrite_a_folder_of_notes(tmp: Path):
    # `qcli quantize SRC notes --overwrite`: a folder qcli never wrote keeps every file
    out = tmp / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return _src(tmp), out, ["--overwrite"]


@case(EXIT_OUTPUT_FAILED, "--overwrite would delete", "todo.md")
def overwrite_a_checkpoint_with_a_stranger_file(tmp: Path):
    out = tmp / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old")
    (out / "todo.md").write_text("mine")  # not a checkpoint file: it would be lost
    return _src(tmp), out, ["--overwrite"]


@case(EXIT_OUTPUT_FAILED, "--overwrite would delete", "runs")
def overwrite_a_folder_with_a_subfolder(tmp: Path):
    out = tmp / "out"
    (out / "runs").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    return _src(tmp), out, ["--overwrite"]


@case(EXIT_BAD_INPUT, "OUT is empty")
def output_argument_empty(tmp: Path):
    return _src(tmp), "", ["--overwrite"]


@case(EXIT_OUTPUT_FAILED, "output path too long for the filesystem")
def output_name_too_long(tmp: Path):
    return _src(tmp), tmp / ("o" * 300), []


@case(EXIT_OUTPUT_FAILED, "output path too long for the filesystem")
def output_parent_name_too_long(tmp: Path):
    return _src(tmp), tmp / ("p" * 300) / "out", []


@case(EXIT_BAD_INPUT, "--max-shard-size", "positive")
def max_shard_size_zero(tmp: Path):
    return _src(tmp), _out(tmp), ["--max-shard-size", "0"]


@case(EXIT_BAD_INPUT, "--max-shard-size", "cannot read size")
def max_shard_size_unreadable(tmp: Path):
    return _src(tmp), _out(tmp), ["--max-shard-size", "lots"]


@case(EXIT_BAD_INPUT, "inside the source checkpoint")
def output_inside_input(tmp: Path):
    src = _src(tmp)
    return src, src / "quantized", []


@case(EXIT_BAD_INPUT, "inside the source checkpoint")
def output_is_input(tmp: Path):
    src = _src(tmp)
    return src, src, ["--overwrite"]


@case(EXIT_BAD_INPUT, "contains the source checkpoint")
def output_contains_input(tmp: Path):
    return _src(tmp), tmp, ["--overwrite"]


@case(EXIT_OUTPUT_FAILED, "not a folder")
def output_is_a_file(tmp: Path):
    (tmp / "out").write_text("not a folder")
    return _src(tmp), _out(tmp), ["--overwrite"]


@case(EXIT_OUTPUT_FAILED, "cannot create", "a file is in the way")
def output_parent_is_a_file(tmp: Path):
    (tmp / "file").write_text("x")
    return _src(tmp), tmp / "file" / "out", []


@case(EXIT_OUTPUT_FAILED, "already exists")
def output_is_a_dangling_symlink(tmp: Path):
    (tmp / "out").symlink_to(tmp / "nowhere")
    return _src(tmp), _out(tmp), []


@case(EXIT_OUTPUT_FAILED, "out")
def output_is_a_symlink_loop(tmp: Path):
    (tmp / "out").symlink_to(tmp / "out")
    return _src(tmp), _out(tmp), ["--overwrite"]


@case(EXIT_BAD_INPUT, "--workers")
def negative_workers(tmp: Path):
    return _src(tmp), _out(tmp), ["--workers", "-3"]


@case(EXIT_BAD_INPUT, UP, "non-finite")
def failed_run_removes_parents_it_created(tmp: Path):
    w = torch.randn(I, H).bfloat16()
    w[0, 0] = float("nan")
    return _src(tmp, extra={UP: w}), tmp / "new" / "deeper" / "out", []


def _bin_src(tmp: Path) -> Path:
    from tests.builders import to_bin

    return to_bin(_src(tmp))


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@case(EXIT_BAD_INPUT, "pytorch_model.bin", "posix.system", "never unpickles code")
def bin_pickle_runs_code(tmp: Path):
    import pickle

    from tests.builders import rewrite_bin

    src = _bin_src(tmp)
    # had it run, the tree check would see tmp/pwned
    payload = pickle.dumps({Q: _RunsCode(tmp / "pwned")}, protocol=2)
    rewrite_bin(src / "pytorch_model.bin", pickle=payload)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "pytorch_model.bin", "legacy PyTorch format", "re-save")
def bin_legacy_format(tmp: Path):
    src = _bin_src(tmp)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "pytorch_model.bin", "compressed")
def bin_storage_compressed(tmp: Path):
    from tests.builders import rewrite_bin

    src = _bin_src(tmp)
    rewrite_bin(src / "pytorch_model.bin", compress=True)
    return src, _out(tmp), []


@case(EXIT_BAD_INPUT, "pytorch_model.bin.index.json", "pytorch_model-00002-of-00002.bin")
def bin_index_names_a_missing_shard(tmp: Path):
    src = _bin_src(tmp)
    wmap = {Q: "pytorch_model.bin", UP: "pytorch_model-00002-of-00002.bin"}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    return src, _out(tmp), []


@pytest.mark.parametrize(("c", "variant"), ZOO.params())
def test_zoo(
    c: Case,
    variant: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a case may name its source relative to the working folder
    src, out, args = c.make(tmp_path)
    code_wanted, *needles = c.expect
    before = tree_state(tmp_path)
    code, stdout, err = run_cli(capsys, "quantize", src, out, "--quiet", *args)
    assert code == code_wanted, err
    assert stdout == ""
    assert_one_line_error(err, *needles)
    assert tree_state(tmp_path) == before  # input unchanged, nothing left behind


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["quantize", "SRC"], "Missing argument 'out'"),
        (["quantize", "SRC", "OUT", "--bogus"], "No such option: --bogus"),
        (["quantize", "SRC", "OUT", "--workers", "many"], "'--workers'"),
        (["quantise", "SRC", "OUT"], "No such command 'quantise'"),
    ],
    ids=["missing-out", "unknown-option", "bad-int", "unknown-command"],
)
def test_usage_errors_are_one_line_too(tmp_path: Path, capsys, argv: list, needle: str) -> None:
    src = _src(tmp_path)
    before = tree_state(tmp_path)
    argv = [{"SRC": str(src), "OUT": str(tmp_path / "out")}.get(a, a) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(err, needle, " -h'")
    assert tree_state(tmp_path) == before


def test_zoo_is_big_enough() -> None:
    assert len(ZOO) >= 25


def test_unmatched_entries_can_be_allowed(tmp_path: Path, capsys) -> None:
    """--allow-unmatched turns the error back into a warning; the run then succeeds."""
    src = _src(tmp_path)
    code, _, err = run_cli(
        capsys,
        "quantize",
        src,
        tmp_path / "out",
        "-t",
        "Linear",
        "-t",
        "re:.*qproj",
        "--allow-unmatched",
    )
    assert code == 0, err
    assert "warning: target 're:.*qproj' matches no module" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --- real filesystems: read-only, full ----------------------------------------------------


def _assert_clean(code: int, err: str, before: dict, root: Path, *needles: str) -> None:
    assert code == EXIT_OUTPUT_FAILED, err
    assert_one_line_error(err, *needles)
    assert tree_state(root) == before


def test_read_only_location(tmp_path: Path, tmpfs, capsys) -> None:
    src = _src(tmp_path)
    ro = tmpfs(tmp_path / "ro", ro=True)
    before = tree_state(tmp_path)
    code, _, err = run_cli(capsys, "quantize", src, ro / "out", "-q")
    _assert_clean(code, err, before, tmp_path, "Read-only file system")
    code, _, err = run_cli(capsys, "quantize", src, ro / "sub" / "out", "-q")
    _assert_clean(code, err, before, tmp_path, "Read-only file system")


def _page(n: int) -> int:
    return -(-n // 4096) * 4096


def _shard_sizes(src: Path, max_shard: int) -> list[int]:
    """Exact sizes of the shards qcli will write (header + data), to size a tmpfs by."""
    from qcli.shards import encode_header, order

    plan = planner.build(open_checkpoint(src), planner.PlanOptions(scheme=get_scheme("W8A8")))
    sizes = []
    for _, tps in sharding.shard_layout(plan, max_shard):
        slots = order(s for tp in tps for s in tp.outputs)
        head, _ = encode_header(slots, {"format": "pt"})
        sizes.append(len(head) + sum(s.nbytes for s in slots))
    return sizes


def test_disk_full_mid_write(tmp_path: Path, tmpfs, capsys) -> None:
    """A filesystem that holds the first shard but not the second: ENOSPC half-way."""
    src = _src(tmp_path)
    sizes = _shard_sizes(src, 40_000)
    assert len(sizes) >= 3
    disk = tmpfs(tmp_path / "disk", size=_page(sizes[0]) + 4096)
    before = tree_state(tmp_path)
    code, _, err = run_cli(capsys, "quantize", src, disk / "out", "-q", "--max-shard-size", "40KB")
    _assert_clean(code, err, before, tmp_path, "No space left on device")


def test_disk_full_at_the_last_small_file(tmp_path: Path, tmpfs, capsys) -> None:
    """Every shard fits but config.json does not: the metadata writes fail cleanly too."""
    src = _src(tmp_path)
    (sizes,) = _shard_sizes(src, 10**12)
    disk = tmpfs(tmp_path / "disk", size=_page(sizes))
    before = tree_state(tmp_path)
    code, _, err = run_cli(capsys, "quantize", src, disk / "out", "-q")
    _assert_clean(code, err, before, tmp_path, "No space left on device")


def test_read_only_source_is_fine(tmp_path: Path, tmpfs, capsys) -> None:
    """qcli never writes to its input: a source on a read-only filesystem quantizes."""
    from tests.reliability.conftest import _mount

    ro = tmpfs(tmp_path / "ro", size=8 << 20)
    src = _src(tmp_path)
    shutil.copytree(src, ro / "src")
    if _mount(["mount", "-o", "remount,ro", str(ro)]):
        pytest.skip("cannot remount read-only")
    before = tree_state(ro)
    code, _, err = run_cli(capsys, "quantize", ro / "src", tmp_path / "out", "-q")
    assert code == 0, err
    assert tree_state(ro) == before
    assert (tmp_path / "out" / SHARD).is_file()


def test_temporary_folders_of_killed_runs_are_removed(tmp_path: Path, capsys) -> None:
    """A run killed with SIGKILL leaves `.OUT.qcli-tmp-PID`; the next run on OUT removes it
    (it holds OUT's lock, so no live run owns it) and touches no other run's folder."""
    src = _src(tmp_path)
    stale = tmp_path / ".out.qcli-tmp-4194304"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a shard")
    other = tmp_path / ".out2.qcli-tmp-4194305"
    other.mkdir()
    code, _, err = run_cli(capsys, "quantize", src, tmp_path / "out", "-q")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out2.qcli-tmp-4194305", "out", "src"]


def test_overwrite_replaces_everything_and_leaves_nothing(tmp_path: Path, capsys) -> None:
    src = _src(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"old")
    code, _, err = run_cli(capsys, "quantize", src, out, "-q", "--overwrite")
    assert code == 0, err
    assert not (out / "stale.safetensors").exists() and (out / SHARD).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
