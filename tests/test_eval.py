"""qcli eval: the windows rule, the statistics, the reference cache, and the command on tiny
models (their numbers say nothing about accuracy: tests/interop/test_eval_real.py uses real
trained weights for that)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from qcli.cli.app import main
from qcli.evaluation import cache as passes
from qcli.evaluation import windows
from qcli.evaluation.stats import Comparison, Divergence, Perplexity, kl_per_token, token_scores
from qcli.evaluation.vllm_engine import TopK, kl_lower_bound
from tests.builders import add_tokenizer, make_model

# --- windows, as llama.cpp's perplexity builds them -------------------------------------------


def test_windows_with_bos_score_every_token_of_each_piece() -> None:
    ids = list(range(100, 125))  # 25 tokens
    w = windows.build(ids, bos=1, ctx=6, max_tokens=None)
    assert w.windows == [[1, *ids[i : i + 5]] for i in range(0, 25, 5)]
    assert w.first_scored == 1 and w.tokens == 25  # every token of every piece


def test_windows_without_bos_score_all_but_the_first() -> None:
    ids = list(range(100, 125))
    w = windows.build(ids, bos=None, ctx=6, max_tokens=None)
    assert w.windows == [ids[0:6], ids[6:12], ids[12:18], ids[18:24]]  # the tail is dropped
    assert w.tokens == 4 * 5


def test_max_tokens_and_short_texts() -> None:
    ids = list(range(100, 125))
    assert windows.build(ids, 1, 6, max_tokens=12).windows == [[1, *ids[0:5]], [1, *ids[5:10]]]
    short = windows.build(ids[:3], 1, 6, None)
    assert short.windows == [[1, *ids[:3]]] and short.tokens == 3
    with pytest.raises(Exception, match="at least 2"):
        windows.build(ids, 1, 1, None)


# --- statistics ---------------------------------------------------------------------------


def test_perplexity_and_its_standard_error() -> None:
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p = Perplexity.of(nll)
    assert p.ppl == pytest.approx(math.exp(2.5))
    sd = math.sqrt(sum((x - 2.5) ** 2 for x in (1, 2, 3, 4)) / 3)
    assert p.stderr == pytest.approx(math.exp(2.5) * sd / 2)


def test_kl_is_zero_for_the_same_model_and_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(7, 50, generator=g), dim=-1)
    assert kl_per_token(logp, logp).abs().max() < 1e-12
    logq = torch.log_softmax(torch.randn(7, 50, generator=g), dim=-1)
    want = (logp.double().exp() * (logp.double() - logq.double())).sum(1)
    assert torch.allclose(kl_per_token(logp, logq), want, atol=1e-6)
    d = Divergence.of(kl_per_token(logp, logq))
    assert d.median <= d.p90 <= d.p99 <= d.max


def test_comparison_of_a_model_with_itself() -> None:
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(30, 40, generator=g), dim=-1)
    targets = torch.randint(0, 40, (30,), generator=g)
    nll, top = token_scores(logp, targets)
    c = Comparison.of(nll, nll, kl_per_token(logp, logp), top == top)
    assert c.ln_ppl_ratio == 0 and c.top1_agreement == 1.0 and c.kld.max == 0
    assert c.reference.ppl == pytest.approx(math.exp(float(nll.double().mean())))


def test_vllm_top_k_kl_is_a_lower_bound_and_exact_with_the_whole_vocabulary() -> None:
    g = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(20, 30, generator=g) * 3, dim=-1)
    logq = torch.log_softmax(logp + 0.3 * torch.randn(20, 30, generator=g), dim=-1)
    exact = kl_per_token(logp, logq)

    def top(logx: torch.Tensor, k: int) -> TopK:
        v, i = logx.topk(k, dim=1)
        return TopK(logx[:, 0], i, v)

    for k in (3, 10):
        assert (kl_lower_bound(top(logp, k), top(logq, k)) <= exact + 1e-9).all()
    assert torch.allclose(kl_lower_bound(top(logp, 30), top(logq, 30)), exact, atol=1e-6)
    rows = top(logp, 5)
    back = TopK.unpack(rows.pack())
    assert torch.equal(back.ids, rows.ids) and torch.equal(back.logp, rows.logp)


# --- the reference cache --------------------------------------------------------------------


def test_reference_pass_is_written_whole_and_read_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("QCLI_CACHE_DIR", str(tmp_path / "cache"))
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    digest = passes.key(ref, [[1, 2, 3]], {"engine": "transformers"})
    assert passes.open_pass(digest) is None
    writer = passes.PassWriter(digest, vocab=4)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    writer.add(a)
    writer.add(b)
    writer.finish({"engine": {"loader": "x"}})
    found = passes.open_pass(digest)
    assert found is not None and found.rows == [2, 3]
    assert torch.equal(found.read(0), a) and torch.equal(found.read(1), b)
    # another text, another settings, or a changed reference file: another key
    assert passes.key(ref, [[1, 2]], {"engine": "transformers"}) != digest
    assert passes.key(ref, [[1, 2, 3]], {"engine": "vllm"}) != digest
    (ref / "config.json").write_text('{"changed": true}')
    assert passes.key(ref, [[1, 2, 3]], {"engine": "transformers"}) != digest


def test_reference_cache_keeps_the_most_recently_used(tmp_path: Path, monkeypatch) -> None:
    """Each pass is tokens x vocab float32 (a GB for a real model): the least recently used
    beyond QCLI_EVAL_CACHE_KEEP go when a new one is written; one just read survives."""
    monkeypatch.setenv("QCLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(passes.KEEP_ENV, "2")

    def write(digest: str) -> None:
        w = passes.PassWriter(digest, vocab=4)
        w.add(torch.randn(1, 4))
        w.finish({})

    for i, d in enumerate(["a" * 32, "b" * 32]):
        write(d)
        os.utime(tmp_path / "cache" / "eval" / d / passes.META, ns=(i * 10**9, i * 10**9))
    assert passes.open_pass("a" * 32) is not None  # used: now the newest
    foreign = tmp_path / "cache" / "eval" / ".x.tmp-1"  # another run's, still writing
    foreign.mkdir()
    write("c" * 32)
    left = sorted(p.name for p in (tmp_path / "cache" / "eval").iterdir())
    assert left == [".x.tmp-1", "a" * 32, "c" * 32]
    assert passes.open_pass("b" * 32) is None and passes.open_pass("c" * 32) is not None


# --- the command on tiny models -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    src = add_tokenizer(make_model("llama", root / "src"))
    outs = {"src": src}
    for scheme in ("W8A8", "FP8_DYNAMIC"):
        out = root / scheme
        assert main(["quantize", str(src), str(out), "-s", scheme, "-q", "--lm-head"]) == 0
        outs[scheme] = out
    return outs


def _eval(capsys, *argv) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = main(["eval", *map(str, argv), "--json", "--ctx", "64", "--max-tokens", "189"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_eval_reports_every_number(tiny, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QCLI_CACHE_DIR", str(tmp_path / "cache"))
    code, body, err = _eval(capsys, tiny["W8A8"])
    for key in ("reference", "quantized"):
        assert body[key]["ppl"] > 1 and body[key]["ppl_stderr"] > 0
    assert body["tokens"] == 189 and body["windows"]["windows"] == 3
    assert set(body["kld"]) == {"mean", "stderr", "median", "p90", "p99", "max"}
    assert 0 <= body["top1_agreement"] <= 1 and "ln_ppl_ratio" in body
    assert body["engines"]["quantized"]["quantized_modules"] == 15
    assert body["engines"]["reference"]["dtype"] in ("float32", "bfloat16")
    assert body["reference_checkpoint"]["origin"] == "qcli_provenance.json"
    assert body["reference_cache"]["reused"] is False
    # the same reference and text again: the reference pass is read from the cache
    code, again, _ = _eval(capsys, tiny["FP8_DYNAMIC"])
    assert again["reference_cache"]["reused"] is True
    assert again["reference"]["ppl"] == body["reference"]["ppl"]


def test_thresholds_decide_the_exit_code_and_options_override_them(tiny, capsys) -> None:
    code, body, _ = _eval(capsys, tiny["W8A8"], "--max-kld-mean", "0")
    assert code == 1 and not body["ok"] and "KL mean" in body["failures"][0]
    assert body["thresholds"]["max_kld_mean"] == 0


def test_eval_refuses_what_it_cannot_measure(tiny, capsys, tmp_path) -> None:
    code = main(["eval", str(tiny["src"])])
    assert code == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    code = main(["eval", str(tiny["W8A8"]), "--text", str(tmp_path / "missing.txt")])
    assert code == 2
    assert "--text" in capsys.readouterr().err
    code = main(["eval", str(tiny["W8A8"]), "--engine", "tensorrt"])
    assert code == 2


def test_update_card_adds_the_table(tiny, capsys, tmp_path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny["W8A8"], out)
    code = main(["eval", str(out), "--update-card", "--ctx", "64", "--max-tokens", "63", "-q"])
    assert code in (0, 1)
    text = (out / "README.md").read_text()
    assert "## Accuracy: `qcli eval`" in text and "KL mean" in text
    main(["eval", str(out), "--update-card", "--ctx", "64", "--max-tokens", "63", "-q"])
    assert (out / "README.md").read_text().count("## Accuracy") == 1  # replaced, not added


def test_vllm_engine_without_vllm_says_so(tiny, capsys) -> None:
    import sys

    code = main(["eval", str(tiny["W8A8"]), "--engine", "vllm", "--vllm-python", sys.executable])
    assert code == 2
    err = capsys.readouterr().err
    assert "has no vLLM" in err and len(err.strip().splitlines()) == 1


def test_sensitivity_ranks_every_group_and_meets_a_budget(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QCLI_CACHE_DIR", str(tmp_path / "cache"))
    capsys.readouterr()
    code = main(
        [
            "eval",
            str(tiny["src"]),
            "--sensitivity",
            "--scheme",
            "W8A8",
            "--json",
            "-q",
            "--ctx",
            "64",
            "--max-tokens",
            "126",
            "--kl-budget",
            "0",
            "--per-layer",
        ]  # fmt: skip
    )
    assert code == 0
    body = json.loads(capsys.readouterr().out)
    names = [g["group"] for g in body["groups"]]
    assert {"lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj", "layer 0", "layer 1"} == set(names)  # fmt: skip
    kls = [g["kld"]["mean"] for g in body["groups"]]
    assert kls == sorted(kls, reverse=True)
    # the units keep vLLM's fused layers together; a budget of 0 keeps every unit dense
    assert body["units"]["k_proj/q_proj/v_proj"] == ["k_proj", "q_proj", "v_proj"]
    assert sorted(body["ignore"]) == sorted(
        [
            "lm_head",
            "re:.*\\.q_proj$",
            "re:.*\\.k_proj$",
            "re:.*\\.v_proj$",
            "re:.*\\.o_proj$",
            "re:.*\\.gate_proj$",
            "re:.*\\.up_proj$",
            "re:.*\\.down_proj$",
        ]  # fmt: skip
    )
    assert abs(body["kl_estimate_with_ignore"]) < 1e-12  # nothing left quantized


def test_a_group_quantized_in_memory_is_put_back(tiny) -> None:
    """Sensitivity quantizes one group at a time in the loaded model: afterwards every weight
    is the original one again, and a tied lm_head is tied again."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qcli.evaluation.sensitivity import _quantized
    from qcli.schemes import get_scheme

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=96,
            tie_word_embeddings=True,
        )  # fmt: skip
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 96, (1, 9))
    dense = model(x).logits
    with _quantized(model, ["lm_head", "model.layers.0.mlp.down_proj"], get_scheme("W8A8")):
        assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied meanwhile
        assert not torch.equal(model(x).logits, dense)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x).logits, dense)
