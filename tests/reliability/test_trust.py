"""Nothing lost, nothing silent: the holes a new user found (each test names its item).

The bad-input cases that fit the zoo's pattern (one error line, the tree unchanged) are in
test_zoo.py; these need more than that pattern checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.reliability.util import assert_one_line_error, run_cli, tree_state
from tests.test_plan import _llama


def _src(tmp: Path, **kw) -> Path:
    return _llama(tmp / "src", **kw)


# --- --overwrite replaces only what is safe to replace -------------------------------------


def test_unset_out_in_a_working_folder_deletes_nothing(tmp_path: Path, capsys, monkeypatch):
    """`qcli quantize SRC "$OUT" --overwrite` with $OUT unset ran on the working folder."""
    src = _src(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("print('mine')")
    monkeypatch.chdir(work)
    before = tree_state(tmp_path)
    for out in ("", "."):
        code, stdout, err = run_cli(capsys, "quantize", src, out, "-q", "--overwrite")
        assert code in (2, 3)
        assert_one_line_error(err, "OUT is empty" if out == "" else "train.py")
        assert tree_state(tmp_path) == before


def test_overwrite_replaces_qcli_output_with_its_copied_files(tmp_path: Path, capsys):
    """qcli's own output may hold any file copied from the source (a LICENSE, a notebook):
    its provenance lists what it wrote, so a rerun with --overwrite replaces all of it."""
    src = _src(tmp_path)
    (src / "LICENSE").write_text("Apache-2.0")
    (src / "notes.ipynb").write_text("{}")
    out = tmp_path / "out"
    assert run_cli(capsys, "quantize", src, out, "-q")[0] == 0
    record = json.loads((out / "qcli_provenance.json").read_text())
    assert {"LICENSE", "notes.ipynb", "config.json", "model.safetensors"} <= set(record["files"])
    code, _, err = run_cli(capsys, "quantize", src, out, "-q", "--overwrite", "-s", "FP8_DYNAMIC")
    assert code == 0, err
    assert (out / "LICENSE").read_text() == "Apache-2.0"
    # a file the user added afterwards is not qcli's: refused, and kept
    (out / "eval.log").write_text("mine")
    code, _, err = run_cli(capsys, "quantize", src, out, "-q", "--overwrite")
    assert code == 3
    assert_one_line_error(err, "eval.log")
    assert (out / "eval.log").read_text() == "mine"


def test_overwrite_replaces_an_empty_folder_or_a_plain_checkpoint(tmp_path: Path, capsys):
    src = _src(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "quantize", src, empty, "-q", "--overwrite")[0] == 0
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "model-00001-of-00002.safetensors",
                 "model.safetensors.index.json", "merges.txt", "vocab.json"):  # fmt: skip
        (plain / name).write_text("{}")
    code, _, err = run_cli(capsys, "quantize", src, plain, "-q", "--overwrite")
    assert code == 0, err
    assert not (plain / "model-00001-of-00002.safetensors").exists()


def test_overwrite_through_a_symlink_never_touches_the_target(tmp_path: Path, capsys):
    src = _src(tmp_path)
    target = tmp_path / "theirs"
    target.mkdir()
    (target / "thesis.tex").write_text("mine")
    (tmp_path / "out").symlink_to(target)
    code, _, err = run_cli(capsys, "quantize", src, tmp_path / "out", "-q", "--overwrite")
    assert code == 0, err
    assert (target / "thesis.tex").read_text() == "mine"
    assert not os.path.islink(tmp_path / "out")


# --- a weight is never dropped silently -------------------------------------------------------


def _shard_without_index_entry(tmp: Path, name: str, alone: bool) -> Path:
    """A two-shard source whose index leaves out `name`; with `alone`, `name` sits in a third
    shard of its own, which the index then does not name at all."""
    from safetensors.torch import load_file, save_file

    src = _src(tmp)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    rest = sorted(n for n in tensors if n != name or not alone)
    half = len(rest) // 2
    wmap = {}
    for i, part in enumerate((rest[:half], rest[half:])):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in part}, src / fname, metadata={"format": "pt"})
        wmap.update(dict.fromkeys(part, fname))
    if alone:
        save_file({name: tensors[name]}, src / "model-00003-of-00003.safetensors")
    wmap.pop(name, None)
    index = {"metadata": {}, "weight_map": wmap}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src


def test_a_tensor_the_index_leaves_out_is_kept_and_named(tmp_path: Path, capsys):
    """An untied model lost its lm_head: it sat in a shard but not in the index."""
    src = _shard_without_index_entry(tmp_path, "lm_head.weight", alone=False)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", src, out, "--lm-head")
    assert code == 0, err
    assert "lm_head.weight" in err and "does not list" in err  # a warning, on stderr
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:  # a small model: one output file
        assert {"lm_head.weight", "lm_head.weight_scale"} <= set(f.keys())
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 0, err


def test_untied_model_without_lm_head_is_refused(tmp_path: Path, capsys):
    """The lm_head alone in a shard that the index does not name: no lm_head is readable, and
    an untied config then loads with a random one."""
    src = _shard_without_index_entry(tmp_path, "lm_head.weight", alone=True)
    before = tree_state(tmp_path)
    code, _, err = run_cli(capsys, "quantize", src, tmp_path / "out", "-q")
    assert code == 2
    assert_one_line_error(err, "tie_word_embeddings: false", "no lm_head")
    assert tree_state(tmp_path) == before
    # inspect says why too, and names the shard the index skips
    code, stdout, err = run_cli(capsys, "inspect", src)
    assert "model-00003-of-00003.safetensors is not named" in stdout + err
    assert "no lm_head weight" in stdout + err
