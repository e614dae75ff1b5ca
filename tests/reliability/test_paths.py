"""Paths and names that trip naive code: symlinks (the hub cache is made of them), spaces and
unicode in folders and files, very long tensor names, names that look like markup.

Every case must quantize, leave its input byte-for-byte unchanged (links included), write real
files (never links into someone's cache), and give a checkpoint `qcli verify` accepts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qcli.tensors import INDEX_NAME
from tests.builders import llama_checkpoint as _llama
from tests.reliability.test_properties import verify_ok
from tests.reliability.util import assert_one_line_error, leftovers, run_cli, tree_state

UNICODE = "modèle ünïcødé 模型 ✓"


def _names(out: Path) -> set[str]:
    names: set[str] = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    return names


def _quantize_ok(capsys, src: Path, out: Path, *args: str) -> str:
    """Quantize (summary shown, so rendering is exercised too), check output and input."""
    before = tree_state(src)
    code, _, err = run_cli(capsys, "quantize", src, out, *args)
    assert code == 0, err
    assert "Traceback" not in err
    assert tree_state(src) == before
    for p in out.iterdir():
        assert p.is_file() and not p.is_symlink(), p
    assert leftovers(out.parent, out.name) == []
    verify_ok(out, capsys, "--fast", "--reference", str(src))
    return err


def _hub_like(root: Path) -> Path:
    """A snapshot folder as huggingface_hub's cache lays it out: every file a relative link
    into ../../blobs/, the shards split with an index."""
    plain = _llama(root / "plain")
    tensors = load_file(plain / "model.safetensors")
    names = sorted(tensors)
    blobs = root / "cache" / "blobs"
    snap = root / "cache" / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    files: dict[str, bytes] = {}
    wmap = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, root / fname, metadata={"format": "pt"})
        files[fname] = (root / fname).read_bytes()
        wmap.update(dict.fromkeys(part, fname))
    files[INDEX_NAME] = json.dumps({"metadata": {}, "weight_map": wmap}).encode()
    files["config.json"] = (plain / "config.json").read_bytes()
    files["tokenizer.json"] = b'{"version": "1.0"}'
    for i, (name, blob) in enumerate(sorted(files.items())):
        (blobs / f"blob{i:02d}").write_bytes(blob)
        os.symlink(f"../../blobs/blob{i:02d}", snap / name)
    return snap


def test_hub_cache_layout_of_symlinks(tmp_path: Path, capsys) -> None:
    snap = _hub_like(tmp_path)
    cache_before = tree_state(tmp_path / "cache")
    out = tmp_path / "out"
    _quantize_ok(capsys, snap, out, "--max-shard-size", "60KB")
    assert tree_state(tmp_path / "cache") == cache_before  # blobs and links untouched
    assert json.loads((out / "tokenizer.json").read_text()) == {"version": "1.0"}


def test_symlinked_source_and_output_parent(tmp_path: Path, capsys) -> None:
    src = _llama(tmp_path / "real-src")
    (tmp_path / "src-link").symlink_to(src, target_is_directory=True)
    (tmp_path / "real-parent").mkdir()
    (tmp_path / "parent-link").symlink_to(tmp_path / "real-parent", target_is_directory=True)
    _quantize_ok(capsys, tmp_path / "src-link", tmp_path / "parent-link" / "out")
    assert (tmp_path / "real-parent" / "out" / "model.safetensors").is_file()


def test_output_symlink_is_not_followed_into_its_target(tmp_path: Path, capsys) -> None:
    """OUT is a link to someone's folder: refused without --overwrite; with it, the link is
    replaced by the result and the folder it pointed to is left alone."""
    src = _llama(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    out.symlink_to(elsewhere, target_is_directory=True)
    before = tree_state(tmp_path)
    code, _, err = run_cli(capsys, "quantize", src, out, "-q")
    assert code == 3
    assert_one_line_error(err, "already exists")
    assert tree_state(tmp_path) == before
    _quantize_ok(capsys, src, out, "--overwrite")
    assert not out.is_symlink() and (elsewhere / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out", "src"]


def test_output_link_to_the_source_is_refused(tmp_path: Path, capsys) -> None:
    src = _llama(tmp_path / "src")
    (tmp_path / "out").symlink_to(src, target_is_directory=True)
    before = tree_state(tmp_path)
    code, _, err = run_cli(capsys, "quantize", src, tmp_path / "out", "-q", "--overwrite")
    assert code == 2
    assert_one_line_error(err, "inside the source checkpoint")
    assert tree_state(tmp_path) == before


def test_spaces_and_unicode_everywhere(tmp_path: Path, capsys) -> None:
    """Folder, shard and output names with spaces and non-ASCII; a non-ASCII tensor name."""
    extra = {f"model.{UNICODE}.weight": torch.ones(64).bfloat16()}
    plain = _llama(tmp_path / "plain", extra=extra)
    tensors = load_file(plain / "model.safetensors")
    src = tmp_path / f"my {UNICODE}"
    src.mkdir()
    names = sorted(tensors)
    wmap = {}
    for i, part in enumerate((names[:5], names[5:])):
        fname = f"shard {i + 1} ✓ of 2.safetensors"
        save_file({n: tensors[n] for n in part}, src / fname, metadata={"format": "pt"})
        wmap.update(dict.fromkeys(part, fname))
    (src / INDEX_NAME).write_text(json.dumps({"weight_map": wmap}, ensure_ascii=False))
    (src / "config.json").write_bytes((plain / "config.json").read_bytes())
    (src / f"notes {UNICODE}.md").write_text("copied along", encoding="utf-8")
    out = tmp_path / f"out put {UNICODE}" / "W8A8 ✓"
    _quantize_ok(capsys, src, out)
    assert f"model.{UNICODE}.weight" in _names(out)
    assert (out / f"notes {UNICODE}.md").read_text(encoding="utf-8") == "copied along"


def test_very_long_tensor_names(tmp_path: Path, capsys) -> None:
    """Tensor names far longer than any file name (they live in JSON, not the filesystem)."""
    long = "model." + "very_long_segment." * 250 + "norm.weight"  # ~4.5 KB
    src = _llama(tmp_path / "src", extra={long: torch.ones(64).bfloat16()})
    out = tmp_path / "out"
    _quantize_ok(capsys, src, out, "--json")
    assert long in _names(out)
    with safe_open(out / "model.safetensors", "pt") as h:
        assert torch.equal(h.get_tensor(long), torch.ones(64).bfloat16())


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "summary"])
def test_names_that_look_like_markup(tmp_path: Path, capsys, quiet: bool) -> None:
    """Tensor names and options from strangers are printed, never interpreted as markup."""
    weird = "model.[bold]x[/bold].[/]weight"
    src = _llama(tmp_path / "src", extra={weird: torch.ones(64).bfloat16()})
    q = ["-q"] if quiet else []
    code, _, err = run_cli(capsys, "quantize", src, tmp_path / "a", "-q", "-i", "re:[/x]")
    assert code == 2
    assert_one_line_error(err, "ignore entry 're:[/x]' matches no")
    err = _quantize_ok(capsys, src, tmp_path / "out", *q, "-i", "re:[/x]", "--allow-unmatched")
    assert weird in _names(tmp_path / "out")
    assert quiet or "warning: ignore entry 're:[/x]' matches no Linear module" in err
