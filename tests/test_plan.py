"""Plan decisions from headers alone: lm_head, tied embeddings, fused groups, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qcli import planner, sharding
from qcli.errors import InputError, PlanError
from qcli.schemes import get_scheme
from qcli.tensors import open_checkpoint
from tests.builders import H, I, V
from tests.builders import llama_checkpoint as _llama


def _plan(path: Path, scheme: str = "W8A8", **kw) -> planner.Plan:
    return planner.build(
        open_checkpoint(path), planner.PlanOptions(scheme=get_scheme(scheme), **kw)
    )


def _group(plan: planner.Plan) -> dict:
    return plan.config["quantization_config"]["config_groups"]["group_0"]


def test_default_keeps_lm_head_dense_and_ignored(tmp_path: Path) -> None:
    plan = _plan(_llama(tmp_path))
    assert plan.lm_head == "dense"
    assert _group(plan)["targets"] == ["Linear"]
    assert plan.config["quantization_config"]["ignore"] == ["lm_head"]
    assert len(plan.quantized) == 7
    lm = next(t for t in plan.tensors if t.source == "lm_head.weight")
    assert lm.action == "copy" and "default ignore" in lm.rule


def test_lm_head_flag_names_it_in_targets(tmp_path: Path) -> None:
    plan = _plan(_llama(tmp_path), lm_head=True)
    assert plan.lm_head == "quantized" and _group(plan)["targets"] == ["lm_head", "Linear"]
    assert plan.config["quantization_config"]["ignore"] == []
    outs = {s.name: s for t in plan.tensors for s in t.outputs}
    assert outs["lm_head.weight"].dtype == "I8" and outs["lm_head.weight_scale"].shape == (V, 1)
    assert outs["lm_head.weight_scale"].dtype == "BF16"


@pytest.mark.parametrize(
    "kw",
    [
        {"targets": ("Linear", "re:.*lm_head$")},
        {"targets": ("Linear", "lm_head")},
        {"default_ignore": False},
    ],
)
def test_lm_head_by_regex_name_or_class_is_named_too(tmp_path: Path, kw: dict) -> None:
    plan = _plan(_llama(tmp_path), **kw)
    assert plan.lm_head == "quantized" and "lm_head" in _group(plan)["targets"]


def test_lm_head_flag_conflicting_with_ignore(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="lm_head"):
        _plan(_llama(tmp_path), lm_head=True, ignore=("lm_head",))


def test_tied_untie_with_lm_head(tmp_path: Path) -> None:
    plan = _plan(_llama(tmp_path, tied=True), lm_head=True)
    assert plan.untie and plan.lm_head == "quantized"
    assert plan.config["tie_word_embeddings"] is False
    names = {s.name for t in plan.tensors for s in t.outputs}
    assert {"lm_head.weight", "lm_head.weight_scale", "model.embed_tokens.weight"} <= names
    emb = [t for t in plan.tensors if t.source == "model.embed_tokens.weight"]
    assert sorted(t.action for t in emb) == ["copy", "quantize"]
    assert any("tied" in w for w in plan.warnings)


def test_tied_without_lm_head_changes_nothing(tmp_path: Path) -> None:
    plan = _plan(_llama(tmp_path, tied=True))
    assert not plan.untie and plan.lm_head == "dense"
    assert plan.config["tie_word_embeddings"] is True
    assert "lm_head" in plan.config["quantization_config"]["ignore"]
    assert "lm_head.weight" not in {s.name for t in plan.tensors for s in t.outputs}


def test_split_fused_group_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="q_proj.*k_proj.*v_proj|fuses"):
        _plan(_llama(tmp_path), ignore=("re:.*k_proj",))
    with pytest.raises(PlanError, match="gate_proj"):
        _plan(_llama(tmp_path), ignore=("model.layers.0.mlp.up_proj",))
    plan = _plan(_llama(tmp_path), ignore=("re:.*mlp\\.(gate|up)_proj",))
    assert "model.layers.0.mlp.gate_proj" in plan.dense_linear


def test_ignored_modules_are_listed_by_name(tmp_path: Path) -> None:
    plan = _plan(_llama(tmp_path), ignore=("re:.*down_proj",))
    assert plan.config["quantization_config"]["ignore"] == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
    ]


def test_w8a16_packs(tmp_path: Path) -> None:
    plan = _plan(_llama(tmp_path), "W8A16")
    outs = {s.name: s for t in plan.tensors for s in t.outputs}
    assert outs["model.layers.0.mlp.down_proj.weight_packed"].shape == (H, I // 4)
    assert outs["model.layers.0.mlp.down_proj.weight_shape"].dtype == "I64"
    assert "model.layers.0.mlp.down_proj.weight" not in outs


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="Linear layers only"):
        _plan(_llama(tmp_path / "a"), targets=("Embedding",))
    with pytest.raises(PlanError, match="'re:nothing' matches no module"):
        _plan(_llama(tmp_path / "b"), targets=("re:nothing",))
    with pytest.raises(PlanError, match="nothing would be quantized"):
        _plan(_llama(tmp_path / "b"), targets=("re:nothing",), allow_unmatched=True)
    quantized = _llama(tmp_path / "c", cfg={"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(InputError, match="already quantized"):
        _plan(quantized)
    scaled = _llama(
        tmp_path / "d", extra={"model.layers.0.mlp.up_proj.weight_scale": torch.ones(I, 1)}
    )
    with pytest.raises(InputError, match="already quantized"):
        _plan(scaled)
    ints = _llama(
        tmp_path / "e",
        extra={"model.layers.0.mlp.up_proj.weight": torch.ones(I, H, dtype=torch.int32)},
    )
    with pytest.raises(InputError, match="float"):
        _plan(ints)


def test_target_matching_nothing_is_an_error_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="target 're:.*nonexistent' matches no module"):
        _plan(_llama(tmp_path), targets=("Linear", "re:.*nonexistent"))
    with pytest.raises(PlanError, match="ignore entry 'mlp' matches no Linear module"):
        _plan(_llama(tmp_path), ignore=("mlp",))
    plan = _plan(_llama(tmp_path), targets=("Linear", "re:.*nonexistent"), allow_unmatched=True)
    assert any("nonexistent" in w for w in plan.warnings)


def test_shard_layout_and_sizes(tmp_path: Path) -> None:
    plan = _plan(_llama(tmp_path), lm_head=True)
    shards = sharding.shard_layout(plan, 40_000)
    assert len(shards) > 1 and shards[0][0].startswith("model-00001-of-")
    assert sum(t.bytes_out for _, ts in shards for t in ts) == plan.bytes_out
    assert sharding.shard_layout(plan, 10**12)[0][0] == "model.safetensors"
    assert sharding.parse_size("5GB") == 5 * 10**9 and sharding.parse_size("2GiB") == 2 * 2**30
    with pytest.raises(InputError):
        sharding.parse_size("lots")
