"""qcli eval on real trained weights: SmolLM2-135M-Instruct (tests/real_models.py).

- every scheme, lm_head dense and quantized, passes; the reference perplexity equals an
  independent computation (transformers and plain torch, the same windows) within 1%;
- planted faults exit 1: one lm_head scale row x4, every scale x0.5;
- --sensitivity ranks the groups, and quantizing the top-ranked units alone (qcli quantize
  --targets) and evaluating them gives the same order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qcli.cli.app import main
from tests.real_models import smollm2

pytestmark = pytest.mark.slow

TOKENS = 2044  # 4 windows of [BOS] + 511: enough to separate the cases, a minute each


@pytest.fixture(scope="module")
def src() -> Path:
    return smollm2()


@pytest.fixture(scope="module")
def outs(src: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smollm2")
    made = {}
    for scheme in ("W8A8", "FP8_DYNAMIC"):
        for lm_head in (False, True):
            name = f"{scheme}{'-lm' if lm_head else ''}"
            args = ["quantize", str(src), str(root / name), "-s", scheme, "-q"]
            assert main(args + (["--lm-head"] if lm_head else [])) == 0
            made[name] = root / name
    return made


def _eval(capsys, out: Path, tokens: int = TOKENS) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["eval", str(out), "--json", "-q", "--max-tokens", str(tokens)])
    return code, json.loads(capsys.readouterr().out)


def _independent_ppl(src: Path) -> float:
    """Perplexity of the same windows computed without qcli: transformers and cross-entropy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcli.evaluation import default_corpus

    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(default_corpus()[0], add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for i in range(TOKENS // 511):
            window = torch.tensor([[tok.bos_token_id, *ids[i * 511 : (i + 1) * 511]]])
            logits = model(window).logits[0, :-1]
            losses.append(
                torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none")
            )
    return float(torch.cat(losses).mean().exp())


@pytest.mark.parametrize("name", ["W8A8", "W8A8-lm", "FP8_DYNAMIC", "FP8_DYNAMIC-lm"])
def test_correct_checkpoints_pass(outs, capsys, name: str) -> None:
    code, body = _eval(capsys, outs[name])
    assert code == 0, body["failures"]
    assert body["tokens"] == TOKENS and body["windows"]["bos_token_id"] == 1
    assert 0 < body["kld"]["mean"] < body["thresholds"]["max_kld_mean"]
    assert body["quantized"]["ppl"] > body["reference"]["ppl"]  # quantization costs something


def test_reference_perplexity_matches_an_independent_computation(outs, src, capsys) -> None:
    code, body = _eval(capsys, outs["W8A8"])
    want = _independent_ppl(src)
    assert abs(body["reference"]["ppl"] / want - 1) < 0.01, (body["reference"]["ppl"], want)


def _most_frequent_token(src: Path) -> int:
    from collections import Counter

    from transformers import AutoTokenizer

    from qcli.evaluation import default_corpus

    ids = AutoTokenizer.from_pretrained(src)(default_corpus()[0], add_special_tokens=False)
    return Counter(ids["input_ids"]).most_common(1)[0][0]


def _edit_scales(out: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    for f in out.glob("*.safetensors"):
        t = load_file(f)
        for k in [k for k in t if k.endswith(".weight_scale")]:
            s = t[k].float()
            edit(k, s)
            t[k] = s.to(t[k].dtype)
        save_file(t, f, metadata={"format": "pt"})


def test_planted_faults_fail(outs, src, capsys, tmp_path: Path) -> None:
    row = _most_frequent_token(src)
    faults = {
        "lm_head row x4": lambda k, s: s[row].mul_(4) if k == "lm_head.weight_scale" else None,
        "every scale x0.5": lambda k, s: s.mul_(0.5),
    }
    for name, edit in faults.items():
        out = tmp_path / name.replace(" ", "-")
        shutil.copytree(outs["W8A8-lm"], out)
        _edit_scales(out, edit)
        code, body = _eval(capsys, out)
        assert code == 1 and not body["ok"], (name, body["kld"])


def test_sensitivity_ranking_holds_when_the_groups_are_quantized_alone(
    src, capsys, tmp_path: Path
) -> None:
    capsys.readouterr()
    code = main(
        [
            "eval",
            str(src),
            "--sensitivity",
            "--scheme",
            "W8A8",
            "--json",
            "-q",
            "--max-tokens",
            "1022",
            "--kl-budget",
            "0.01",
        ]  # fmt: skip
    )
    assert code == 0
    found = json.loads(capsys.readouterr().out)
    kl = {g["group"]: g["kld"]["mean"] for g in found["groups"]}
    assert {"lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"} <= set(kl)
    assert found["ignore"], "a budget of 0.01 nats needs some groups kept dense"
    # the units (what a checkpoint can keep dense together), by their summed KL
    units = sorted(found["units"], key=lambda u: -sum(kl[g] for g in found["units"][u]))[:3]
    measured = {}
    for unit in units:
        out = tmp_path / unit.replace("/", "-")
        targets = [t for g in found["units"][unit] for t in ("-t", _target(g))]
        args = ["quantize", str(src), str(out), "-q", *targets, "--allow-unmatched"]
        if unit == "lm_head":
            args += ["--lm-head"]
        assert main(args) == 0
        code, body = _eval(capsys, out, 1022)
        measured[unit] = body["kld"]["mean"]
    assert sorted(units, key=lambda u: -measured[u]) == units, (units, measured)


def _target(group: str) -> str:
    return group if group == "lm_head" else f"re:.*\\.{group}$"
