"""`qcli inspect` and `quantize --dry-run`: checkpoints and plans from headers alone.

Checkpoints are real ones (saved by transformers, quantized by qcli); the CLI runs in-process
through `main`, except where the test is about what a fresh process imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qcli.cli import main
from qcli.cli.views.common import collapse, layer_pattern
from qcli.tensors import open_checkpoint
from tests.builders import load_config


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def quantize(src: Path, out: Path, *extra: str) -> Path:
    assert main(["quantize", str(src), str(out), "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {
        "w8a8-lm": quantize(models["llama-sharded"], root / "w8a8", "--lm-head"),
        "w8a16": quantize(models["llama"], root / "w8a16", "--scheme", "W8A16"),
    }


# --- a dense checkpoint ----------------------------------------------------------------


def test_json_lists_every_tensor_and_module(models, capsys) -> None:
    src = models["llama-sharded"]
    body = run_json(capsys, "inspect", src)
    ck = open_checkpoint(src)
    assert body["sharded"] and len(body["files"]) == len(ck.files) > 1
    assert [t["name"] for t in body["tensors"]] == list(ck.tensors)
    assert body["bytes"] == ck.total_bytes
    assert body["parameters"] == sum(t.numel for t in ck.tensors.values())
    assert body["architectures"] == ["LlamaForCausalLM"] and body["model_type"] == "llama"
    assert body["dtypes"] == ["BF16"] and not body["quantized"]
    modules = {m["name"]: m for m in body["modules"]}
    assert modules["lm_head"]["kind"] == "Linear" and modules["lm_head"]["role"] == "lm_head"
    assert modules["model.embed_tokens"]["kind"] == "Embedding"
    assert modules["model.norm"]["kind"] == "Norm"
    assert modules["model.layers.1.self_attn.q_proj"]["shape"] == [128, 128]
    files = {f["name"]: f for f in body["files"]}
    for t in body["tensors"]:
        assert t["file"] in files and t["kind"] != "?"
    assert sum(f["tensors"] for f in files.values()) == len(body["tensors"])
    assert all(f["bytes"] == (src / name).stat().st_size for name, f in files.items())


def test_default_plan_is_shown(models, capsys) -> None:
    body = run_json(capsys, "inspect", models["llama"])
    plan = body["plan"]
    assert plan["scheme"] == "W8A8" and plan["lm_head"] == "dense"
    assert plan["lm_head_rule"].startswith("default ignore")
    head = next(t for t in plan["tensors"] if t["name"] == "lm_head.weight")
    assert head["action"] == "copy"
    assert plan["ignore"] == ["lm_head"]
    assert body["plan_error"] is None


def test_plan_with_options(models, capsys) -> None:
    body = run_json(capsys, "inspect", models["llama-sharded"], "--scheme", "W8A8", "--lm-head")
    plan = body["plan"]
    assert plan["lm_head"] == "quantized" and plan["lm_head_rule"] == "--lm-head"
    by_name = {t["name"]: t for t in plan["tensors"]}
    head = by_name["lm_head.weight"]
    assert head["action"] == "quantize" and head["rule"] == "--lm-head"
    assert [o["name"] for o in head["outputs"]] == ["lm_head.weight", "lm_head.weight_scale"]
    assert head["outputs"][0]["dtype"] == "I8"
    assert by_name["model.embed_tokens.weight"]["action"] == "copy"
    q = by_name["model.layers.0.mlp.down_proj.weight"]
    assert q["rule"] == "target 'Linear' (class)" and q["bytes_out"] < q["bytes_in"]
    assert plan["targets"] == ["lm_head", "Linear"] and plan["ignore"] == []
    assert plan["bytes_out"] == sum(t["bytes_out"] for t in plan["tensors"])
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in plan["fused_groups"]


def test_rules_show_why(models, capsys) -> None:
    body = run_json(
        capsys,
        "inspect",
        models["llama"],
        "--ignore",
        "re:.*down_proj$",
        "--ignore",
        "model.layers.1.self_attn.o_proj",
        "--targets",
        "Linear",
        "--targets",
        "re:.*nothing.*",
        "--allow-unmatched",
    )
    rules = {t["name"]: t["rule"] for t in body["plan"]["tensors"]}
    assert rules["model.layers.0.mlp.down_proj.weight"] == "ignore 're:.*down_proj$' (regex)"
    assert rules["model.layers.1.self_attn.o_proj.weight"] == (
        "ignore 'model.layers.1.self_attn.o_proj' (name)"
    )
    assert rules["model.layers.0.self_attn.o_proj.weight"] == "target 'Linear' (class)"
    assert any("'re:.*nothing.*' matches no module" in w for w in body["plan"]["warnings"])


def test_unmatched_entry_is_an_error_unless_allowed(models, capsys) -> None:
    code, out, err = run(capsys, "inspect", models["llama"], "-i", "re:.*[0-9]_nope", "--json")
    assert code == 2 and "matches no Linear module" in json.loads(out)["plan_error"]
    code, out, _ = run(capsys, "inspect", models["llama"], "-i", "re:.*[0-9]_nope")
    assert code == 2 and "re:.*[0-9]_nope" in out  # printed as typed, not read as markup


def test_split_fused_group_is_refused_but_checkpoint_shown(models, capsys) -> None:
    code, out, err = run(
        capsys, "inspect", models["llama"], "-i", "model.layers.0.self_attn.k_proj"
    )
    assert code == 2
    assert "LlamaForCausalLM" in out and "lm_head.weight" in out  # the summary still shows
    assert "no quantize plan" in out and "vLLM fuses" in out
    code, out, _ = run(
        capsys, "inspect", models["llama"], "--json", "-t", "re:nothing", "--allow-unmatched"
    )
    body = json.loads(out)
    assert code == 2 and body["plan"] is None and "select no Linear" in body["plan_error"]
    assert len(body["tensors"]) == len(open_checkpoint(models["llama"]).tensors)


def test_tied_embeddings(models, capsys) -> None:
    body = run_json(capsys, "inspect", models["qwen2"])
    assert body["tied_embeddings"] is True
    assert "lm_head" not in {m["name"] for m in body["modules"]}
    assert body["plan"]["lm_head"] == "dense" and "tied" in body["plan"]["lm_head_rule"]
    body = run_json(capsys, "inspect", models["qwen2"], "--lm-head")
    plan = body["plan"]
    assert plan["lm_head"] == "quantized" and plan["untie_lm_head"]
    head = next(t for t in plan["tensors"] if t["module"] == "lm_head")
    assert head["name"] == "model.embed_tokens.weight" and "untied" in head["note"]
    assert any("tied embeddings" in w for w in plan["warnings"])
    assert plan["quantization_config"]["ignore"] == []


def test_tables_collapse_layers_and_expand_on_request(models, capsys) -> None:
    src = models["llama-sharded"]
    code, out, _ = run(capsys, "inspect", src)
    assert code == 0
    assert "model.layers.{0-1}.self_attn.q_proj.weight" in out
    assert "model.layers.0.self_attn.q_proj.weight" not in out
    assert "lm_head.weight" in out and "model.embed_tokens.weight" in out
    assert "Linear (lm_head)" in out and "Embedding" in out and "Norm" in out
    assert "default ignore" in out and "fused groups" in out
    _, out, _ = run(capsys, "inspect", src, "--all")
    assert "model.layers.0.self_attn.q_proj.weight" in out
    assert "model.layers.1.self_attn.q_proj.weight" in out
    _, out, _ = run(capsys, "inspect", src, "--filter", r"layers\.1\.mlp")
    assert "model.layers.1.mlp.up_proj.weight" in out
    assert "model.layers.0.mlp.up_proj.weight" not in out and "lm_head.weight" not in out
    code, _, err = run(capsys, "inspect", src, "--filter", "(")
    assert code == 2 and "invalid --filter" in err and len(err.strip().splitlines()) == 1


def test_collapse() -> None:
    names = [f"m.layers.{i}.mlp.experts.{e}.w1.weight" for i in (0, 1, 2, 5) for e in (0, 1)]
    assert layer_pattern(names[0]) == "m.layers.*.mlp.experts.*.w1.weight"
    (c,) = collapse(names)
    assert c.indices == "0-2,5" and len(c.names) == 8
    assert c.label == "m.layers.{0-2,5}.mlp.experts.*.w1.weight ×8"
    (c,) = collapse(["a.0.b", "a.1.b", "a.2.b"])
    assert c.label == "a.{0-2}.b"
    assert [c.pattern for c in collapse(["lm_head.weight", "a.0.b", "a.1.b"])] == [
        "lm_head.weight",
        "a.*.b",
    ]


def test_bad_source(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "inspect", tmp_path / "no" / "such")
    assert code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "inspect", tmp_path)
    assert code == 2 and "no config.json" in err


# --- quantize --dry-run ------------------------------------------------------------------


def test_dry_run_writes_nothing(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "quantize", models["llama-sharded"], out, "--dry-run")
    assert code == 0 and not out.exists() and err == ""  # the plan is the result: stdout
    assert "lm_head: dense" in stdout and "dry run: nothing written" in stdout
    assert "Plan: W8A8" in stdout
    code, stdout, err = run(
        capsys, "quantize", models["llama"], out, "--dry-run", "--lm-head", "--json", "-q"
    )
    assert code == 0 and not out.exists() and err == ""
    body = json.loads(stdout)
    assert body["dry_run"] and body["lm_head"] == "quantized" and body["files"]
    assert body["source"] == {"path": str(models["llama"].resolve())}
    assert body["output_problems"] == []


def test_dry_run_matches_inspect_and_the_real_run(models, tmp_path: Path, capsys) -> None:
    args = ["--scheme", "FP8_DYNAMIC", "--lm-head", "--max-shard-size", "200KB"]
    code, stdout, _ = run(
        capsys, "quantize", models["llama-sharded"], tmp_path / "o", "--dry-run", "--json", *args
    )
    dry = json.loads(stdout)
    seen = run_json(capsys, "inspect", models["llama-sharded"], *args[:3])["plan"]
    for key in ("tensors", "quantization_config", "bytes_out", "lm_head", "fused_groups"):
        assert dry[key] == seen[key], key
    out = quantize(models["llama-sharded"], tmp_path / "o", *args)
    assert load_config(out)["quantization_config"] == dry["quantization_config"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(dry["files"])
    written = sum(t.nbytes for t in open_checkpoint(out).tensors.values())
    assert written == dry["bytes_out"]
    # ... and a second dry run says the real run would now stop on the existing OUT
    code, stdout, err = run(
        capsys, "quantize", models["llama-sharded"], out, "--dry-run", "--json", *args
    )
    assert code == 0 and "already exists" in json.loads(stdout)["output_problems"][0]


def test_dry_run_bad_options_exit_2(models, tmp_path: Path, capsys) -> None:
    code, _, err = run(
        capsys, "quantize", models["llama"], tmp_path / "o", "--dry-run", "-t", "re:nothing"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# --- a quantized checkpoint --------------------------------------------------------------


def test_quantized_checkpoint(quantized, capsys) -> None:
    out = quantized["w8a8-lm"]
    body = run_json(capsys, "inspect", out)
    assert body["quantized"] and body["plan"] is None and body["plan_error"] is None
    q = body["quantization"]
    assert [g["scheme"] for g in q["groups"]] == ["W8A8"]
    assert q["groups"][0]["format"] == "int-quantized" and q["groups"][0]["modules"] == 15
    assert q["lm_head"] == "quantized" and "lm_head" in q["quantized_modules"]
    assert "model.layers.1.mlp.down_proj" in q["quantized_modules"]
    assert q["dense_linear_modules"] == [] and q["unmatched_modules"] == []
    assert q["contract"]["ok"] and q["contract"]["findings"] == []
    assert q["contract"]["lm_head"]["vllm"] is True
    assert 1.5 < q["compression_ratio"] < 2.0 and q["dense_dtype"] == "BF16"
    assert body["parameters_by_dtype"]["I8"] > body["parameters_by_dtype"]["BF16"]
    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0
    assert "W8A8" in stdout and "int-quantized" in stdout and "lm_head: quantized" in stdout
    assert "contract: ok" in stdout and "compression:" in stdout


def test_quantized_packed_counts_parameters(quantized, models, capsys) -> None:
    body = run_json(capsys, "inspect", quantized["w8a16"])
    q = body["quantization"]
    assert [g["scheme"] for g in q["groups"]] == ["W8A16"] and q["lm_head"] == "dense"
    assert q["ignore"] == ["lm_head"] and q["dense_linear_modules"] == ["lm_head"]
    dense = run_json(capsys, "inspect", models["llama"])
    assert body["parameters"] == dense["parameters"]  # 4 int8 per int32, scales not counted
    assert q["contract"]["ok"]


def test_contract_findings_are_shown(quantized, tmp_path: Path, capsys) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(quantized["w8a16"], broken)
    cfg = load_config(broken)
    del cfg["quantization_config"]["quantization_status"]
    (broken / "config.json").write_text(json.dumps(cfg))
    body = run_json(capsys, "inspect", broken)
    contract = body["quantization"]["contract"]
    assert not contract["ok"] and contract["errors"] >= 1
    assert any("quantization_status" in f["subject"] + f["problem"] for f in contract["findings"])
    code, stdout, _ = run(capsys, "inspect", broken)
    assert code == 0 and "Contract:" in stdout and "error" in stdout


def test_plan_options_on_quantized_checkpoint_exit_2(quantized, capsys) -> None:
    code, out, err = run(capsys, "inspect", quantized["w8a16"], "--scheme", "W8A8", "--json")
    assert code == 2 and "already quantized" in json.loads(out)["plan_error"]


# --- no torch on the header path --------------------------------------------------------


@pytest.mark.parametrize("what", ["dense", "quantized", "dry-run"])
def test_header_path_never_imports_torch(what: str, models, quantized, tmp_path: Path) -> None:
    args = {
        "dense": ["inspect", str(models["llama-sharded"]), "--lm-head"],
        "quantized": ["inspect", str(quantized["w8a8-lm"])],
        "dry-run": ["quantize", str(models["llama"]), str(tmp_path / "o"), "--dry-run"],
    }[what]
    code = (
        "import sys; from qcli.cli import main; rc = main(sys.argv[1:]);"
        " heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers',"
        " 'compressed_tensors', 'safetensors', 'huggingface_hub', 'numpy'});"
        " print(rc, heavy)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout + r.stderr
