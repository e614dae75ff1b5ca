"""Nothing lost, nothing silent: the holes a new user found (each test names its item).

The bad-input cases that fit the zoo's pattern (one error line, the tree unchanged) are in
test_zoo.py; these need more than that pattern checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.builders import H, I
from tests.builders import llama_checkpoint as _llama
from tests.reliability.util import assert_one_line_error, run_cli, tree_state


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


# --- a valid checkpoint that one loader cannot run: said once -------------------------------


def test_int8_moe_experts_are_named_once_in_quantize_and_verify(tmp_path: Path, capsys):
    """transformers 5.24 cannot load int8 experts (tests/interop/test_moe_loaders.py shows
    it): quantize warns once, verify reports one finding, for all 24 expert projections."""
    from tests.builders import moe_checkpoint

    src = moe_checkpoint(tmp_path / "moe")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", src, out)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "MoE expert" in ln]
    assert len(lines) == 1 and "24 MoE expert projections, 24 quantized" in lines[0]
    assert "transformers 5.24" in lines[0] and "AMX" in lines[0] and "FP8_DYNAMIC" in lines[0]
    code, stdout, err = run_cli(capsys, "verify", out, "--json", "--tokens", "7")
    assert code == 0, err
    body = json.loads(stdout)
    found = [f for f in body["findings"] if f["check"] == "tensors.expert"]
    assert len(found) == 1 and found[0]["severity"] == "warning"
    assert "24 MoE expert projection" in found[0]["problem"]
    assert "transformers 5.24" in found[0]["consequence"]
    # eval (which replaced verify --e2e) stops before loading, with the same one message
    code, _, err = run_cli(capsys, "eval", out)
    assert code == 2
    assert_one_line_error(err, "transformers 5.24", "AMX")
    # FP8_DYNAMIC experts load in transformers: nothing to say
    code, _, err = run_cli(capsys, "quantize", src, tmp_path / "fp8", "-s", "FP8_DYNAMIC")
    assert code == 0 and "MoE expert" not in err
    # W8A8 with every expert kept dense does not load either (the same interop test): the
    # same one line and one finding, saying they are dense
    dense = tmp_path / "dense-experts"
    code, _, err = run_cli(capsys, "quantize", src, dense, "--ignore", r"re:.*\.experts\..*")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "MoE expert" in ln]
    assert len(lines) == 1 and "24 MoE expert projections, 0 quantized" in lines[0], lines
    code, stdout, err = run_cli(capsys, "verify", dense, "--json", "--tokens", "7")
    assert code == 0, err
    found = [f for f in json.loads(stdout)["findings"] if f["check"] == "tensors.expert"]
    assert len(found) == 1 and "24 MoE expert projection(s) kept dense" in found[0]["problem"]


# --- output that scripts and people can use -------------------------------------------------


def _shell(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command line run by the shell, with stdout a pipe or a file (not a terminal)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run(
        cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


QCLI_SH = f"{sys.executable} -c 'from qcli.cli.app import run; run()'"


def test_results_on_stdout_diagnostics_on_stderr(tmp_path: Path):
    """`qcli inspect X | grep lm_head` and `qcli verify X > report.txt` work."""
    src = _src(tmp_path)
    r = _shell(f"{QCLI_SH} inspect {src} | grep lm_head", tmp_path)
    assert r.returncode == 0 and "lm_head.weight" in r.stdout and r.stderr == "", r.stderr
    r = _shell(f"{QCLI_SH} quantize {src} out --lm-head > run.txt", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote" in (tmp_path / "run.txt").read_text()
    assert "W8A8 (int-quantized)" in r.stderr  # the plan, as the run starts: a diagnostic
    r = _shell(f"{QCLI_SH} verify out > report.txt", tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    report = (tmp_path / "report.txt").read_text()
    assert "verify: ok" in report and "lm_head" in report


def test_nothing_is_cut_or_wrapped_when_stdout_is_not_a_terminal(tmp_path: Path):
    """Tensor names and findings were split mid-word at 80 columns in CI logs."""
    leaf = "an_unusually_long_projection_name_that_no_terminal_of_eighty_columns_would_hold"
    name = f"model.layers.0.mlp.{leaf}.weight"
    src = _llama(tmp_path / "src", extra={name: torch.randn(I, H).bfloat16()})
    r = _shell(f"{QCLI_SH} inspect {src} --all | cat", tmp_path)
    assert r.returncode == 0, r.stderr
    assert any(name in line for line in r.stdout.splitlines())


def test_errors_with_json_are_json_too(tmp_path: Path, capsys):
    src = _src(tmp_path)
    for argv, code in (
        (["quantize", src, tmp_path / "o", "--scheme", "W4", "--json"], 2),
        (["inspect", tmp_path / "nowhere", "--json"], 2),
        (["verify", src, "--json"], 2),  # a dense checkpoint: nothing to verify
    ):
        got, stdout, err = run_cli(capsys, *argv)
        assert got == code
        body = json.loads(stdout)
        assert body["exit_code"] == code and body["error"] in err
        assert_one_line_error(err)


def test_tied_config_with_lm_head_on_disk_says_what_was_written(tmp_path: Path, capsys):
    """A tied config with lm_head.weight on disk printed "lm_head quantized" and "lm_head
    stays tied" together."""
    from safetensors.torch import load_file

    src = _src(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert "lm_head.weight" in load_file(src / "model.safetensors")
    code, stdout, err = run_cli(capsys, "quantize", src, tmp_path / "q", "--lm-head")
    assert code == 0, err
    said = stdout + err
    assert "stays tied" not in said
    head_lines = [ln for ln in said.splitlines() if ln.startswith("lm_head:")]
    assert head_lines and all("quantized" in ln for ln in head_lines), head_lines
    assert all("tie_word_embeddings set to false" in ln for ln in head_lines)
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    assert written["tie_word_embeddings"] is False
    code, stdout, err = run_cli(capsys, "quantize", src, tmp_path / "d")
    assert code == 0, err
    head_lines = [ln for ln in (stdout + err).splitlines() if ln.startswith("lm_head:")]
    assert head_lines and all("dense" in ln and "skip" in ln for ln in head_lines)


def test_classification_head_stays_dense_unless_named(tmp_path: Path, capsys):
    """LlamaForSequenceClassification's `score` is kept dense, like lm_head."""
    src = _src(tmp_path, extra={"score.weight": torch.randn(3, H).bfloat16()})
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (src / "config.json").write_text(json.dumps(config))
    code, stdout, _ = run_cli(capsys, "quantize", src, tmp_path / "a", "--json", "-q")
    assert code == 0
    assert "score" in json.loads(stdout)["dense_linear_modules"]
    code, stdout, err = run_cli(
        capsys, "quantize", src, tmp_path / "b", "--json", "-q", "-t", "Linear", "-t", "score"
    )
    assert code == 0, err
    assert "score" not in json.loads(stdout)["dense_linear_modules"]


def test_a_shard_size_below_the_largest_tensor_says_so(tmp_path: Path, capsys):
    src = _src(tmp_path)
    code, _, err = run_cli(capsys, "quantize", src, tmp_path / "o", "--max-shard-size", "1KB")
    assert code == 0, err
    assert "smaller than the largest tensor" in err and "a shard of its own" in err


def test_verify_says_the_recorded_source_was_deleted(tmp_path: Path, capsys):
    import shutil

    src = _src(tmp_path)
    out = tmp_path / "out"
    assert run_cli(capsys, "quantize", src, out, "-q")[0] == 0
    shutil.rmtree(src)
    code, stdout, err = run_cli(capsys, "verify", out, "--json")
    assert code == 0, err
    note = json.loads(stdout)["reference_note"]
    assert "no longer exists" in note and str(src) in note
    assert "no local source recorded" not in note
