"""qcli.kinds against the classes transformers really builds.

For each architecture a tiny model is built on the meta device. Its state dict, with tied
weights dropped and transformers' own save-time conversions reverted (per-expert MoE
weights, legacy VLM prefixes), is exactly what `save_pretrained` writes (checked once for
real below); that is the "checkpoint on disk" handed to `classify`, together with the
config.json transformers would write. qcli's answer must then match the model: its Linear
modules are the `nn.Linear` instances (plus MoE routers and per-expert projections, which
transformers 5 builds as non-Linear modules, see qcli/kinds.py), its Embedding modules the
`nn.Embedding` instances, and so on, all under their on-disk names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoConfig  # noqa: E402
from transformers.core_model_loading import revert_weight_conversion  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from qcli.heads import tied_embeddings  # noqa: E402
from qcli.kinds import (  # noqa: E402
    UnsupportedArchitecture,
    classify,
    fused_groups,
)

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=128,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)


@dataclass(frozen=True)
class Case:
    auto: str  # the Auto class that builds it
    model_type: str
    config: dict[str, Any]
    fused: int = 0  # how many fused groups fused_groups must find among its Linear modules
    refuses: str | None = None  # a phrase of the UnsupportedArchitecture message, if refused


CAUSAL = "AutoModelForCausalLM"
CASES = {
    "llama": Case(CAUSAL, "llama", TEXT, fused=4),
    "qwen2-tied": Case(CAUSAL, "qwen2", dict(TEXT, tie_word_embeddings=True), fused=4),
    "mistral": Case(CAUSAL, "mistral", TEXT, fused=4),
    "gemma2": Case(CAUSAL, "gemma2", TEXT, fused=4),
    "phi3": Case(CAUSAL, "phi3", dict(TEXT, pad_token_id=0)),  # qkv_proj/gate_up_proj on disk
    "gpt2": Case(CAUSAL, "gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256)),
    "gpt_neox": Case(
        CAUSAL,
        "gpt_neox",
        dict(TEXT, num_attention_heads=4, tie_word_embeddings=False),
    ),
    "opt": Case(
        CAUSAL,
        "opt",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        ),
        fused=2,
    ),
    "falcon": Case(
        CAUSAL,
        "falcon",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    ),
    "bert": Case(
        "AutoModelForMaskedLM",
        "bert",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
        ),
        fused=2,
    ),
    "t5": Case(
        "AutoModelForSeq2SeqLM",
        "t5",
        dict(
            d_model=64,
            d_ff=128,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            d_kv=16,
            vocab_size=256,
        ),
        fused=3,  # encoder self-attention, decoder self- and cross-attention
    ),
    "bart": Case(
        "AutoModelForSeq2SeqLM",
        "bart",
        dict(
            d_model=64,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
        ),
        fused=3,
    ),
    "mixtral": Case(CAUSAL, "mixtral", dict(TEXT, num_local_experts=4), fused=2 + 2),
    "qwen3_moe": Case(
        CAUSAL,
        "qwen3_moe",
        dict(TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
        fused=2 + 2,
    ),
    "deepseek_v3": Case(
        CAUSAL,
        "deepseek_v3",
        dict(
            TEXT,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
        # per layer fused_qkv_a_proj; layer 0 dense gate_up; layer 1 shared gate_up + experts
        fused=2 + 1 + 2,
    ),
    "gpt_oss": Case(
        CAUSAL,
        "gpt_oss",
        dict(TEXT, num_local_experts=4, num_experts_per_tok=2, layer_types=None),
        refuses="fused",
    ),
    "llava": Case(
        "AutoModelForImageTextToText",
        "llava",
        dict(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=32),
        ),
        fused=4 + 1,  # language model q/k/v and gate/up, vision tower q/k/v
    ),
    "gemma3-vlm": Case(
        "AutoModelForImageTextToText",
        "gemma3",
        dict(
            text_config=dict(TEXT, model_type="gemma3_text"),
            vision_config=dict(VISION, model_type="siglip_vision_model"),
            mm_tokens_per_image=4,
        ),
        fused=4 + 1,
    ),
    "qwen2_vl": Case(
        "AutoModelForImageTextToText",
        "qwen2_vl",
        dict(
            text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(
                depth=1,
                embed_dim=32,
                hidden_size=64,
                num_heads=2,
                mlp_ratio=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
        ),
        fused=4,
    ),
}


def _build(case: Case):
    cfg = AutoConfig.for_model(case.model_type, **case.config)
    with torch.device("meta"):
        model = getattr(transformers, case.auto).from_config(cfg)
    return cfg, model


def _untied_state(model) -> dict[str, Any]:
    """The state dict save_pretrained starts from: tied copies dropped."""
    tied = set(model.all_tied_weights_keys)
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def _disk_sources(model) -> dict[str, str]:
    """On-disk tensor name -> the state-dict key it comes from."""
    state = _untied_state(model)
    by_id = {id(v): k for k, v in state.items()}
    sources = {}
    for disk_name, value in revert_weight_conversion(model, dict(state)).items():
        if id(value) in by_id:  # a renamed tensor is passed through as is
            sources[disk_name] = by_id[id(value)]
    # tensors made by a conversion (per-expert slices): revert their sources one by one;
    # renames alone must not be reverted one key at a time (Kimi-K2.5 renames fc2 -> fc1
    # and fc1 -> fc0, which only comes out right for the whole state dict at once)
    for key in state.keys() - set(sources.values()):
        for disk_name in revert_weight_conversion(model, {key: state[key]}):
            sources.setdefault(disk_name, key)
    return sources


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _truth(model) -> dict[str, set[str]]:
    """On-disk names of the modules transformers builds, by what qcli should call them."""
    modules_of: dict[str, set[str]] = {}
    for disk_name, key in _disk_sources(model).items():
        modules_of.setdefault(key, set()).add(_parent(disk_name))
    truth: dict[str, set[str]] = {k: set() for k in ("Linear", "Embedding", "Conv1D", "Conv")}
    truth.update(router=set(), expert=set(), norm=set())
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        disk: set[str] = set()
        for param, _ in module.named_parameters(recurse=False):
            disk |= modules_of.get(prefix + param, set())
        cls = type(module).__name__
        if isinstance(module, torch.nn.Linear):
            truth["Linear"] |= disk
        elif isinstance(module, torch.nn.Embedding):
            truth["Embedding"] |= disk
        elif isinstance(module, Conv1D):
            truth["Conv1D"] |= disk
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            truth["Conv"] |= disk
        elif cls.endswith("Router"):
            truth["router"] |= disk
        elif cls.endswith("Experts"):
            truth["expert"] |= disk
        elif "Norm" in cls:
            truth["norm"] |= disk
    return truth


def _checkpoint(model) -> dict[str, tuple[str, tuple[int, ...]]]:
    disk = revert_weight_conversion(model, _untied_state(model))
    return {k: (DTYPES[v.dtype], tuple(v.shape)) for k, v in disk.items()}


def _lm_head_tied(model) -> bool:
    """Whether the model's output projection shares the input embedding's weight."""
    head = model.get_output_embeddings()
    if head is None:
        return False
    name = next(n for n, m in model.named_modules() if m is head)
    return f"{name}.weight" in model.all_tied_weights_keys


def _disagreements(model, modules: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Where qcli's modules differ from what transformers builds; empty when they agree."""

    def having(kind: str | None = None, role: str | None = None) -> set[str]:
        return {
            n
            for n, m in modules.items()
            if (kind is None or m.kind == kind) and (role is None or m.role == role)
        }

    truth = _truth(model)
    found = []

    def differ(what: str, mine: set[str], expected: set[str]) -> None:
        if mine != expected:
            found.append(f"{what}: extra {sorted(mine - expected)[:4]}, "
                         f"missing {sorted(expected - mine)[:4]}")  # fmt: skip

    # routers: transformers' *Router modules, plus router-like nn.Linear (Qwen2-MoE's
    # shared_expert_gate, PhiMoE's gate) that qcli marks too, so the planner keeps them dense
    differ("router", having(role="router") - truth["Linear"], truth["router"])
    differ("expert", having(role="expert") - truth["Linear"], truth["expert"])
    differ("Linear", having("Linear"), truth["Linear"] | truth["router"] | truth["expert"])
    for kind in ("Embedding", "Conv1D", "Conv"):
        differ(kind, having(kind), truth[kind])
    differ("Norm", having("Norm") - truth["norm"], set())
    if tied_embeddings(config) != _lm_head_tied(model):
        found.append(f"tied: qcli says {tied_embeddings(config)}")
    return found


@pytest.mark.parametrize("arch", sorted(CASES))
def test_kinds_match_transformers(arch: str) -> None:
    case = CASES[arch]
    cfg, model = _build(case)
    tensors = _checkpoint(model)
    config = cfg.to_diff_dict()  # what config.json holds: defaults left out

    if case.refuses:
        with pytest.raises(UnsupportedArchitecture, match=case.refuses):
            classify(tensors, config)
        return
    modules = classify(tensors, config)

    owned = [t for m in modules.values() for t in m.tensors]
    assert sorted(owned) == sorted(tensors), "every tensor belongs to exactly one module"
    assert _disagreements(model, modules, config) == []
    assert {n for n, m in modules.items() if m.role == "expert"} == _truth(model)["expert"]

    groups = fused_groups(n for n, m in modules.items() if m.kind == "Linear")
    assert len(groups) == case.fused, groups
    assert all(len(g) >= 2 for g in groups)


def test_moe_disk_names_are_what_save_pretrained_writes(tmp_path) -> None:
    """The reverted state dict above is what transformers really saves (per-expert 2-D)."""
    from safetensors import safe_open

    case = CASES["qwen3_moe"]
    cfg = AutoConfig.for_model(case.model_type, **dict(case.config, num_hidden_layers=1))
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        on_disk = {k: ("F32", tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    assert on_disk == _checkpoint(model)
    modules = classify(on_disk, cfg.to_diff_dict())
    experts = {n for n, m in modules.items() if m.role == "expert"}
    assert experts == {f"model.layers.0.mlp.experts.{e}.{p}" for e in range(4) for p in
                       ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
    assert modules["model.layers.0.mlp.gate"].role == "router"


def test_moe_in_model_layout_is_refused() -> None:
    """transformers 5's in-memory layout (3-D fused experts) is not a checkpoint qcli reads."""
    cfg, model = _build(CASES["qwen3_moe"])
    state = {k: ("F32", tuple(v.shape)) for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitecture, match="fused"):
        classify(state, cfg.to_diff_dict())


def test_tie_defaults_match_every_transformers_config() -> None:
    """tied_embeddings({"model_type": t}) is each config class's default, for every type."""
    from transformers import CONFIG_MAPPING

    wrong = []
    for model_type in sorted(CONFIG_MAPPING.keys()):
        try:
            cfg = CONFIG_MAPPING[model_type]()
        except Exception:  # a few configs cannot be built from defaults alone
            continue
        if tied_embeddings({"model_type": model_type}) != _default_tie(cfg):
            wrong.append(model_type)
    assert not wrong


def _default_tie(cfg) -> bool:
    """The config's own value, else that of the sub-config its language model is built from."""
    for holder in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "decoder", None)):
        if holder is not None and hasattr(holder, "tie_word_embeddings"):
            return bool(holder.tie_word_embeddings)
    return False


@pytest.mark.parametrize(
    "config",
    [
        {
            "model_type": "llava",
            "text_config": {"model_type": "llama", "tie_word_embeddings": True},
        },
        {"model_type": "llava", "text_config": {"model_type": "llama"}},
        {"model_type": "qwen2_vl", "text_config": {"tie_word_embeddings": True}},
        {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}},
        {"model_type": "mistral3", "tie_word_embeddings": False},
        {"model_type": "mllama", "text_config": {"model_type": "mllama_text_model"}},
        {"model_type": "gemma2", "tie_word_embeddings": False},
        {"model_type": "qwen2", "tie_word_embeddings": True},
        {
            "model_type": "encoder-decoder",
            "encoder": {"model_type": "bert"},
            "decoder": {"model_type": "gpt2", "tie_word_embeddings": False},
        },
    ],
)
def test_tie_nested_configs_match_transformers(config: dict) -> None:
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(config["model_type"], **kwargs)
    assert tied_embeddings(config) == _default_tie(cfg)


# --- every generative architecture of the installed transformers (slow) --------------------

# Where qcli and transformers 5.24 still disagree, and why that is acceptable.
SWEEP_KNOWN = {
    "apertus1p5": "VQ codebook `quantize.embedding` is an nn.Linear; weight-normed convs",
    "molmo2": "its embedding table is the parameter `wte.embedding`, not `.weight`",
    "pi0": "`gemma_expert.lm_head` is an nn.Embedding",
    "step3p7": "custom vision classes: an nn.Linear holding in_proj_weight, an Embedding root",
    "laguna": "a router bias stored on the experts container (kind Other here)",
    "bert-generation": "a bias-only lm_head block, taken for a tied Linear (no weight either way)",
    "bigbird_pegasus": "config ties, but BigBirdPegasusForCausalLM declares no tied weights",
    "cpmant": "config ties, but CpmAntForCausalLM declares no tied weights",
    "blip": "no get_output_embeddings(), so the test cannot see its (tied) head",
}


def _shrunk(config):
    """The default config with at most two layers per stack, so meta builds stay quick."""
    subs = ("text_config", "vision_config", "audio_config", "encoder", "decoder")
    holders = [config] + [getattr(config, s) for s in subs if hasattr(config, s)]
    layers = ("num_hidden_layers", "num_layers", "n_layer", "encoder_layers", "decoder_layers",
              "num_decoder_layers", "depth")  # fmt: skip
    for holder in holders:
        for attr in layers:
            if isinstance(getattr(holder, attr, None), int) and getattr(holder, attr) > 2:
                try:
                    setattr(holder, attr, 2)
                except Exception:  # a strict config may refuse; its default is fine too
                    pass
    return config


@pytest.mark.slow
def test_every_generative_architecture_agrees_or_is_refused() -> None:
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto as auto

    mappings = (
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )
    classes = {t: c for m in reversed(mappings) for t, c in m.items()}
    agreed, refused, wrong = [], [], {}
    for model_type, cls in sorted(classes.items()):
        cls = cls[0] if isinstance(cls, (list, tuple)) else cls
        try:
            cfg = _shrunk(CONFIG_MAPPING[model_type]())
            with torch.device("meta"):
                model = getattr(transformers, cls)._from_config(cfg)
            tensors = _checkpoint(model)
        except Exception:  # default configs that do not build, optional dependencies
            continue
        config = cfg.to_diff_dict()
        try:
            modules = classify(tensors, config)
        except UnsupportedArchitecture as e:
            refused.append(model_type)
            assert "expert" in str(e), (model_type, str(e))
            continue
        try:
            found = _disagreements(model, modules, config)
        except ValueError:  # a converter that cannot be reverted one key at a time
            continue
        if found and model_type not in SWEEP_KNOWN:
            wrong[model_type] = found
        agreed += [] if found else [model_type]
    assert not wrong
    assert len(agreed) > 200, (len(agreed), refused)
