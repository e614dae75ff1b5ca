"""qcli.kinds on hand-written tensor lists: no torch, no transformers."""

from __future__ import annotations

import dataclasses

import pytest

from qcli.heads import tied_embeddings
from qcli.kinds import Module, UnsupportedArchitecture, classify, fused_groups

H, F, V = 64, 128, 256  # hidden, feed-forward (intermediate), vocabulary
LLAMA_CONFIG = {"model_type": "llama", "hidden_size": H, "vocab_size": V}


def _llama_layer(prefix: str, mlp: str = "mlp") -> dict[str, tuple[str, tuple[int, ...]]]:
    t = {}
    for proj, shape in [("q_proj", (H, H)), ("k_proj", (32, H)), ("v_proj", (32, H)),
                        ("o_proj", (H, H))]:  # fmt: skip
        t[f"{prefix}.self_attn.{proj}.weight"] = ("BF16", shape)
    if mlp:
        for proj, shape in [("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))]:
            t[f"{prefix}.{mlp}.{proj}.weight"] = ("BF16", shape)
    t[f"{prefix}.input_layernorm.weight"] = ("BF16", (H,))
    t[f"{prefix}.post_attention_layernorm.weight"] = ("BF16", (H,))
    return t


def _llama(tied: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    t = {"model.embed_tokens.weight": ("BF16", (V, H)), "model.norm.weight": ("BF16", (H,))}
    t |= _llama_layer("model.layers.0") | _llama_layer("model.layers.1")
    if not tied:
        t["lm_head.weight"] = ("BF16", (V, H))
    return t


def _owned_once(modules: dict[str, Module], tensors) -> None:
    owned = [t for m in modules.values() for t in m.tensors]
    assert sorted(owned) == sorted(tensors)


def _kinds(modules: dict[str, Module]) -> dict[str, str]:
    return {name: m.kind for name, m in modules.items()}


# --- classify: dense decoders ---------------------------------------------------------------


def test_llama_kinds_roles_and_weights() -> None:
    tensors = _llama()
    modules = classify(tensors, LLAMA_CONFIG)
    _owned_once(modules, tensors)
    q = modules["model.layers.0.self_attn.q_proj"]
    assert (q.kind, q.role, q.weight) == ("Linear", "attention", q.name + ".weight")
    assert modules["model.layers.1.mlp.down_proj"].role == "mlp"
    assert (modules["lm_head"].kind, modules["lm_head"].role) == ("Linear", "lm_head")
    embed = modules["model.embed_tokens"]
    assert (embed.kind, embed.role) == ("Embedding", "embedding")
    assert modules["model.norm"].kind == "Norm"
    linear = {n for n, m in modules.items() if m.kind == "Linear"}
    assert len(linear) == 2 * 7 + 1


def test_tied_checkpoint_has_no_lm_head_module() -> None:
    modules = classify(_llama(tied=True), LLAMA_CONFIG)
    assert "lm_head" not in modules


def test_shapes_may_be_lists_as_in_json_headers() -> None:
    tensors = {k: (d, list(s)) for k, (d, s) in _llama().items()}
    assert classify(tensors, LLAMA_CONFIG)["lm_head"].kind == "Linear"


def test_module_is_frozen() -> None:
    module = classify(_llama(), LLAMA_CONFIG)["lm_head"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.kind = "Other"  # type: ignore[misc]


def test_bias_and_bare_parameters_get_owners() -> None:
    tensors = {
        "final_logits_bias": ("F32", (1, V)),  # BART: a parameter of the root module
        "cls.predictions.bias": ("F32", (V,)),  # BERT: of BertLMPredictionHead
        "cls.predictions.transform.dense.weight": ("F32", (H, H)),
        "cls.predictions.transform.dense.bias": ("F32", (H,)),
        "vision.embeddings.class_embedding": ("F32", (H,)),  # CLIP: of the embeddings block
    }
    modules = classify(tensors, {"model_type": "bert", "vocab_size": V})
    _owned_once(modules, tensors)
    assert modules[""].kind == "Other" and modules[""].weight is None
    assert modules["cls.predictions"].kind == "Other"
    dense = modules["cls.predictions.transform.dense"]
    assert dense.kind == "Linear" and len(dense.tensors) == 2
    assert modules["vision.embeddings"].kind == "Other"


def test_tied_output_head_with_only_a_bias_is_linear() -> None:
    # CTRL, ELECTRA, XLNet: the head's weight is the embedding, its bias is on disk
    tensors = {"lm_head.bias": ("F32", (V,)), "transformer.w.weight": ("F32", (V, H))}
    modules = classify(tensors, {"model_type": "ctrl", "vocab_size": V, "n_embd": H})
    assert (modules["lm_head"].kind, modules["lm_head"].role, modules["lm_head"].weight) == (
        "Linear",
        "lm_head",
        None,
    )
    assert modules["transformer.w"].kind == "Embedding"  # CTRL calls its embedding `w`


# --- classify: embeddings, norms, convs -------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "transformer.wte",
        "transformer.wpe",
        "shared",
        "bert.embeddings.word_embeddings",
        "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings",
        "model.decoder.embed_positions",
        "gpt_neox.embed_in",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
        "backbone.embeddings",
    ],
)
def test_embedding_names(name: str) -> None:
    tensors = {f"{name}.weight": ("F32", (V, H))}
    assert classify(tensors, {"model_type": "x"})[name].kind == "Embedding"


@pytest.mark.parametrize(
    "name", ["gpt_neox.embed_out", "electra.embeddings_project", "model.patch_embedding"]
)
def test_linears_whose_name_mentions_embeddings(name: str) -> None:
    tensors = {f"{name}.weight": ("F32", (H, V))}
    assert classify(tensors, {"model_type": "x"})[name].kind == "Linear"


def test_unfamiliar_embedding_name_is_confirmed_by_the_config_sizes() -> None:
    tensors = {"model.token_emb_table.weight": ("F32", (V, H))}
    config = {"model_type": "x", "text_config": {"vocab_size": V}}
    assert classify(tensors, config)["model.token_emb_table"].kind == "Embedding"


def test_unfamiliar_embedding_name_without_matching_sizes_is_refused() -> None:
    tensors = {"model.token_emb_table.weight": ("F32", (1000, 24))}
    with pytest.raises(UnsupportedArchitecture, match="Embedding or a Linear"):
        classify(tensors, {"model_type": "x", "vocab_size": V, "hidden_size": H})


def test_norms_convs_and_one_dimensional_weights() -> None:
    tensors = {
        "model.layers.0.input_layernorm.weight": ("BF16", (H,)),
        "transformer.ln_f.weight": ("F32", (H,)),
        "vision_tower.pre_layrnorm.weight": ("F32", (H,)),  # CLIP's spelling
        "vision_tower.embeddings.patch_embedding.weight": ("F32", (H, 3, 8, 8)),
        "model.layers.0.mixer.conv1d.weight": ("F32", (H, 1, 4)),
        "model.layers.0.mixer.D": ("F32", (H,)),
        "model.scaler.weight": ("F32", (H,)),
        "vision.patch_embed.pos_emb.weight": ("F32", (8, 8, H)),
    }
    kinds = _kinds(classify(tensors, {"model_type": "x"}))
    assert kinds == {
        "model.layers.0.input_layernorm": "Norm",
        "transformer.ln_f": "Norm",
        "vision_tower.pre_layrnorm": "Norm",
        "vision_tower.embeddings.patch_embedding": "Conv",
        "model.layers.0.mixer.conv1d": "Conv",
        "model.layers.0.mixer": "Other",
        "model.scaler": "Other",
        "vision.patch_embed.pos_emb": "Other",
    }


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [("gpt2", "Conv1D"), ("openai-gpt", "Conv1D"), ("gpt_bigcode", "Linear")],
)
def test_gpt2_family_uses_conv1d(model_type: str, kind: str) -> None:
    tensors = {
        "transformer.h.0.attn.c_attn.weight": ("F32", (H, 3 * H)),
        "transformer.h.0.attn.c_attn.bias": ("F32", (3 * H,)),
        "transformer.h.0.mlp.c_fc.weight": ("F32", (H, 4 * H)),
    }
    modules = classify(tensors, {"model_type": model_type})
    assert {m.kind for m in modules.values()} == {kind}
    assert modules["transformer.h.0.attn.c_attn"].role == "attention"


def test_conv1d_found_in_a_nested_config() -> None:
    tensors = {"decoder.transformer.h.0.attn.c_attn.weight": ("F32", (H, 3 * H))}
    config = {"model_type": "vision-encoder-decoder", "decoder": {"model_type": "gpt2"}}
    assert classify(tensors, config)["decoder.transformer.h.0.attn.c_attn"].kind == "Conv1D"


# --- classify: roles ----------------------------------------------------------------------------


def test_vision_and_audio_roles() -> None:
    tensors = {
        "vision_tower.encoder.layers.0.self_attn.q_proj.weight": ("F32", (H, H)),
        "multi_modal_projector.linear_1.weight": ("F32", (H, H)),
        "visual.merger.mlp.0.weight": ("F32", (H, H)),
        "audio_tower.layers.0.fc1.weight": ("F32", (H, H)),
        "language_model.model.layers.0.self_attn.q_proj.weight": ("F32", (H, H)),
        "language_model.lm_head.weight": ("F32", (V, H)),
    }
    roles = {n: m.role for n, m in classify(tensors, {"model_type": "llava"}).items()}
    assert roles == {
        "vision_tower.encoder.layers.0.self_attn.q_proj": "vision",
        "multi_modal_projector.linear_1": "vision",
        "visual.merger.mlp.0": "vision",
        "audio_tower.layers.0.fc1": "audio",
        "language_model.model.layers.0.self_attn.q_proj": "attention",
        "language_model.lm_head": "lm_head",
    }


def test_bert_attention_output_is_attention_not_mlp() -> None:
    tensors = {
        "bert.encoder.layer.0.attention.output.dense.weight": ("F32", (H, H)),
        "bert.encoder.layer.0.output.dense.weight": ("F32", (H, F)),
    }
    modules = classify(tensors, {"model_type": "bert"})
    assert modules["bert.encoder.layer.0.attention.output.dense"].role == "attention"
    assert modules["bert.encoder.layer.0.output.dense"].role == "mlp"


# --- classify: mixture of experts ---------------------------------------------------------------


def _mixtral(experts: int = 3) -> dict[str, tuple[str, tuple[int, ...]]]:
    t = _llama_layer("model.layers.0", mlp="")
    moe = "model.layers.0.block_sparse_moe"
    t[f"{moe}.gate.weight"] = ("BF16", (experts, H))
    for e in range(experts):
        for w, shape in [("w1", (F, H)), ("w2", (H, F)), ("w3", (F, H))]:
            t[f"{moe}.experts.{e}.{w}.weight"] = ("BF16", shape)
    return t


def test_mixtral_experts_are_linear_experts_and_the_gate_a_router() -> None:
    tensors = _mixtral()
    modules = classify(tensors, {"model_type": "mixtral"})
    _owned_once(modules, tensors)
    gate = modules["model.layers.0.block_sparse_moe.gate"]
    assert (gate.kind, gate.role) == ("Linear", "router")
    expert = modules["model.layers.0.block_sparse_moe.experts.2.w3"]
    assert (expert.kind, expert.role) == ("Linear", "expert")
    assert sum(m.role == "expert" for m in modules.values()) == 9


def test_deepseek_router_bias_and_qwen_shared_expert_gate() -> None:
    tensors = {
        "model.layers.1.mlp.gate.weight": ("BF16", (4, H)),
        "model.layers.1.mlp.gate.e_score_correction_bias": ("F32", (4,)),
        "model.layers.1.mlp.experts.0.gate_proj.weight": ("BF16", (32, H)),
        "model.layers.1.mlp.shared_expert.gate_proj.weight": ("BF16", (32, H)),
        "model.layers.1.mlp.shared_expert_gate.weight": ("BF16", (1, H)),
    }
    modules = classify(tensors, {"model_type": "deepseek_v3"})
    gate = modules["model.layers.1.mlp.gate"]
    assert gate.role == "router" and len(gate.tensors) == 2
    assert modules["model.layers.1.mlp.shared_expert_gate"].role == "router"
    assert modules["model.layers.1.mlp.shared_expert.gate_proj"].role == "mlp"


def test_a_dense_mlp_gate_is_no_router() -> None:
    # a module called `gate` with no experts beside it is an ordinary linear layer
    tensors = {"model.layers.0.mlp.gate.weight": ("BF16", (F, H))}
    assert classify(tensors, LLAMA_CONFIG)["model.layers.0.mlp.gate"].role == "mlp"


@pytest.mark.parametrize(
    "tensors",
    [
        # transformers 5 in-memory layout, gpt-oss and Llama 4 on disk
        {"model.layers.0.mlp.experts.gate_up_proj": ("BF16", (4, H, 2 * F))},
        # DBRX: every expert's w1 concatenated in one 2-D tensor
        {"transformer.blocks.0.ffn.experts.mlp.w1": ("BF16", (4 * F, H))},
        # Granite MoE / JetMoE: 3-D `.weight` of a parallel-experts module
        {"model.layers.0.block_sparse_moe.input_linear.weight": ("BF16", (4, 2 * F, H))},
    ],
)
def test_fused_experts_are_refused(tensors) -> None:
    with pytest.raises(UnsupportedArchitecture, match="expert"):
        classify(tensors, {"model_type": "x"})


def test_bias_on_an_experts_container_is_not_fused_experts() -> None:
    tensors = {
        "model.layers.0.mlp.experts.e_score_correction_bias": ("F32", (4,)),
        "model.layers.0.mlp.experts.0.gate_proj.weight": ("BF16", (32, H)),
    }
    modules = classify(tensors, {"model_type": "x"})
    assert modules["model.layers.0.mlp.experts"].kind == "Other"


# --- classify: quantized inputs -------------------------------------------------------------


def test_compressed_tensors_checkpoint_groups_scales_with_weights() -> None:
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": ("I8", (H, H)),
        "model.layers.0.self_attn.q_proj.weight_scale": ("BF16", (H, 1)),
        "model.layers.0.mlp.up_proj.weight_packed": ("I32", (F, H // 4)),
        "model.layers.0.mlp.up_proj.weight_scale": ("BF16", (F, 1)),
        "model.layers.0.mlp.up_proj.weight_shape": ("I64", (2,)),
    }
    config = {"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}}
    modules = classify(tensors, config)
    q = modules["model.layers.0.self_attn.q_proj"]
    assert q.kind == "Linear" and len(q.tensors) == 2
    up = modules["model.layers.0.mlp.up_proj"]
    assert (up.kind, up.weight, len(up.tensors)) == ("Linear", up.name + ".weight_packed", 3)


def test_other_quantization_methods_are_refused() -> None:
    tensors = {"model.layers.0.self_attn.q_proj.qweight": ("I32", (H // 8, H))}
    with pytest.raises(UnsupportedArchitecture, match="gptq"):
        classify(tensors, {"model_type": "llama", "quantization_config": {"quant_method": "gptq"}})


# --- fused_groups -------------------------------------------------------------------------------


def test_fused_groups_llama() -> None:
    names = [n.removesuffix(".weight") for n in _llama() if n.endswith("proj.weight")]
    assert fused_groups(names) == [
        tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv"),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        tuple(f"model.layers.1.self_attn.{p}_proj" for p in "qkv"),
        ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"),
    ]


def test_fused_groups_need_every_part() -> None:
    assert fused_groups(["a.q_proj", "a.k_proj", "a.o_proj", "b.gate_proj"]) == []


def test_fused_groups_other_spellings() -> None:
    names = [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.value",
        "model.layers.0.self_attn.q_a_proj",
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
        "model.layers.0.self_attn.kv_b_proj",
        "model.layers.0.feed_forward.w1",
        "model.layers.0.feed_forward.w2",
        "model.layers.0.feed_forward.w3",
        "encoder.block.0.layer.0.SelfAttention.q",
        "encoder.block.0.layer.0.SelfAttention.k",
        "encoder.block.0.layer.0.SelfAttention.v",
    ]
    assert fused_groups(names) == [
        tuple(f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")),
        ("model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa"),
        ("model.layers.0.feed_forward.w1", "model.layers.0.feed_forward.w3"),
        tuple(f"encoder.block.0.layer.0.SelfAttention.{p}" for p in "qkv"),
    ]


def test_fused_groups_puts_all_experts_of_a_layer_together() -> None:
    moe = "model.layers.0.block_sparse_moe"
    names = [n.removesuffix(".weight") for n in _mixtral(experts=12) if "experts" in n]
    names = names[::-1] + names[:3]  # order and duplicates do not matter
    (group,) = fused_groups(names)
    assert len(group) == 36
    assert group[:4] == (f"{moe}.experts.0.w1", f"{moe}.experts.0.w2", f"{moe}.experts.0.w3",
                         f"{moe}.experts.1.w1")  # fmt: skip
    assert group[-1] == f"{moe}.experts.11.w3"  # numeric, not lexical, order


def test_fused_groups_experts_and_attention_of_several_layers() -> None:
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.experts.0.gate_proj",
        "model.layers.0.mlp.experts.0.up_proj",
        "model.layers.1.mlp.experts.0.down_proj",
    ]
    groups = fused_groups(names)
    assert groups[0] == tuple(names[:3])
    assert ("model.layers.0.mlp.experts.0.gate_proj", "model.layers.0.mlp.experts.0.up_proj") in (
        groups
    )
    assert ("model.layers.1.mlp.experts.0.down_proj",) in groups


# --- tied_embeddings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "tied"),
    [
        ({"model_type": "llama"}, False),
        ({"model_type": "qwen2"}, False),
        ({"model_type": "qwen2", "tie_word_embeddings": True}, True),
        ({"model_type": "gemma2"}, True),
        ({"model_type": "gemma2", "tie_word_embeddings": False}, False),
        ({"model_type": "gpt2"}, True),
        ({"model_type": "opt"}, True),
        ({"model_type": "mistral"}, False),
        ({"model_type": "something-new"}, False),
        ({}, False),
        # pre-v5 Llava configs kept the flag in text_config; transformers moves it up
        ({"model_type": "llava", "text_config": {"tie_word_embeddings": True}}, True),
        ({"model_type": "llava", "text_config": {"model_type": "llama"}}, False),
        ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, True),
        # no top-level flag: the language model's own config decides
        ({"model_type": "mllama"}, False),
        ({"model_type": "mllama", "text_config": {"tie_word_embeddings": True}}, True),
        ({"model_type": "blip-2", "text_config": {"model_type": "opt"}}, True),
        ({"model_type": "encoder-decoder", "decoder": {"model_type": "gpt2"}}, True),
        ({"model_type": "encoder-decoder", "decoder": {"model_type": "llama"}}, False),
        # the vision wrapper forces its own flag to False; its decoder still ties itself
        (
            {
                "model_type": "vision-encoder-decoder",
                "tie_word_embeddings": False,
                "decoder": {"model_type": "trocr"},
            },
            True,
        ),
    ],
)
def test_tied_embeddings(config: dict, tied: bool) -> None:
    assert tied_embeddings(config) is tied
