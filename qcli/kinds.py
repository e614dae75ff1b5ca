"""What kind of module owns each tensor of a checkpoint, decided from headers alone.

compressed-tensors matches `targets` / `ignore` entries such as `Linear` against the
class of each module in the model that loads the checkpoint. A checkpoint on disk has
no classes, only tensor names, dtypes, shapes and config.json, so qcli reconstructs the
class transformers would build for every module from those. This module must not
import torch or transformers: `qcli inspect` runs it on headers only.

Decisions, checked against transformers 5.24 by tests/interop/test_kinds_vs_transformers.py:

- A 2-D `.weight` is a `Linear`, unless its name says embedding (`Embedding`), the
  model type builds GPT-2's transposed `Conv1D` for it, or it is a norm or a conv.
- MoE routers (`mlp.gate`, `router`, `shared_expert_gate`) are kind `Linear`, role
  `router`: vLLM builds them as linear layers (usually unquantized) and transformers 4
  as `nn.Linear`; transformers 5 builds most as `*TopKRouter` modules that are not
  `nn.Linear`, so a target `Linear` does not reach them there. Either way a quantized
  router does not load: the planner keeps them dense and lists them in `ignore`.
- MoE experts stored per expert (`experts.<i>.gate_proj` / `w1` ..., 2-D) are kind
  `Linear`, role `expert`. That is how compressed-tensors checkpoints spell them and how
  both loaders read them: vLLM's FusedMoE takes its scheme from the group that matches
  `experts.0.gate_proj` (class `Linear`), and transformers 5 (whose model fuses the
  experts into 3-D parameters that are not modules) dequantizes the per-expert tensors
  while merging them, taking the scheme of the first class-target group. transformers
  5.24 does that for float-quantized (FP8) and pack-quantized (W8A16) experts only; it
  fails to load int-quantized (W8A8 int8) experts. Experts stored fused on disk (3-D
  `experts.gate_up_proj`, DBRX, Granite/JetMoE `input_linear`) are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qcli import layout

__all__ = [
    "Module",
    "UnsupportedArchitecture",
    "classify",
    "fused_groups",
]

LINEAR = "Linear"
EMBEDDING = "Embedding"
CONV1D = "Conv1D"
CONV = "Conv"
NORM = "Norm"
OTHER = "Other"


class UnsupportedArchitecture(ValueError):
    """qcli cannot tell reliably what kind of module some tensor belongs to."""


@dataclass(frozen=True)
class Module:
    """One module of the model, as transformers would build it, seen from the checkpoint."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"; "" for the root
    kind: str  # "Linear", "Embedding", "Conv1D", "Conv", "Norm" or "Other"
    role: str | None  # "lm_head", "embedding", "router", "expert", "vision", "audio", ...
    # its weight tensor (`.weight`, or `.weight_packed` when packed); None when the module
    # has none on disk (norm-less blocks, bare parameters, a head tied to the embedding)
    weight: str | None
    tensors: tuple[str, ...]  # every tensor of the checkpoint that this module owns


# --- names ------------------------------------------------------------------------------

# Leaf names that transformers builds as nn.Embedding (or a subclass) wherever they hold
# a 2-D weight; gathered from every causal-LM, seq2seq and image-text model in 5.24.
_EMBEDDING_LEAVES = frozenset(
    {
        "embed_tokens", "word_embeddings", "word_embedding", "wte", "wpe", "shared",
        "position_embeddings", "position_embedding", "token_type_embeddings",
        "embed_positions", "embed_in", "tok_embeddings", "tokens_embed", "positions_embed",
        "relative_attention_bias", "embeddings", "embedding", "pos_embed", "emb",
        "x_position_embeddings", "y_position_embeddings", "segment_embedding",
        "input_embedding", "ngram_embeddings", "embed_global", "bias_values",
        "audio_bos_eos_token",
    }
)  # fmt: skip

# Leaves whose name mentions embeddings but that transformers builds as nn.Linear.
_LINEAR_DESPITE_NAME = frozenset(
    {
        "embed_out", "embeddings_project", "vision_embed_tokens", "relative_pos_embeddings",
        "embedding_hidden_mapping_in", "embedder", "video_embedder",
    }
)  # fmt: skip
_LINEAR_WORDS = ("proj", "patch", "head", "mapping", "linear", "dense", "fc")

# Model types whose attention/MLP are transformers' GPT-2 `Conv1D` (weight [in, out]).
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt"})
_CONV1D_LEAVES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})

# Leaf names of the output projection to the vocabulary (tied to the embedding or not).
_LM_HEAD_LEAVES = frozenset(
    {"lm_head", "embed_out", "output_layer", "generator_lm_head", "lm_loss", "proj_out",
     "output_projection"}
)  # fmt: skip
# Top-level heads of sequence / token classification and question answering models
# (LlamaForSequenceClassification's `score`, BERT's `classifier`, RoBERTa's
# `classifier.out_proj`): kept dense by default, like lm_head.
_CLASSIFIER_HEADS = frozenset({"score", "classifier", "qa_outputs"})
# Names that only say "embedding" in one model type: (model type, leaf) -> kind.
_MODEL_TYPE_LEAVES = {("ctrl", "w"): "Embedding"}
_ROUTER_LEAVES = frozenset({"gate", "router", "gating", "shared_expert_gate"})
_ATTENTION_PARTS = frozenset(
    {"self_attn", "attention", "attn", "cross_attn", "encoder_attn", "self_attention",
     "selfattention", "encdecattention", "crossattention", "linear_attn"}
)  # fmt: skip
_MLP_PARTS = frozenset(
    {"mlp", "feed_forward", "ffn", "densereludense", "intermediate", "output",
     "shared_expert", "shared_experts", "block_sparse_moe"}
)  # fmt: skip
_VISION_PARTS = frozenset(
    {"vit", "vpm", "resampler", "connector", "mlp1", "mm_projector", "multi_modal_projector",
     "vqmodel", "merger", "language_projection", "query_tokens"}
)  # fmt: skip
_VISION_WORDS = ("vision", "visual", "image", "img_", "patch_embed", "projector", "qformer")
_AUDIO_WORDS = ("audio", "speech", "whisper")
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.(expert_)?\d+\.")
_NORM_LEAF = re.compile(r"norm|^ln(_|\d|$)|layrnorm", re.IGNORECASE)


# --- classify ---------------------------------------------------------------------------


def classify(
    tensors: Mapping[str, tuple[str, Sequence[int]]], config: Mapping[str, Any]
) -> dict[str, Module]:
    """Group tensors by owning module and decide each module's kind and role.

    `tensors` maps a tensor name to (safetensors dtype string, shape); `config` is the
    parsed config.json. Every tensor lands in exactly one returned Module: the one named
    by the tensor name minus its last component ("" for a top-level tensor).
    Raises UnsupportedArchitecture with a one-line reason where the kind is a guess.
    """
    _refuse_foreign_quantization(config)
    owned: dict[str, list[str]] = {}
    for name in tensors:
        owned.setdefault(_parent(name), []).append(name)
    context = _Context(config, owned)
    modules = {}
    for module_name, names in owned.items():
        modules[module_name] = _module(module_name, tuple(names), tensors, context)
    return modules


class _Context:
    """What deciding one module needs to know about the rest of the checkpoint."""

    def __init__(self, config: Mapping[str, Any], owned: Mapping[str, list[str]]):
        self.model_types = model_types(config)
        self.sizes = _config_ints(config)
        # parents that hold an `experts` child: their `gate` / `router` is a router
        # modules with modules under them: a bias-only output head among them is a block
        # (RoBERTa's lm_head holds dense + layer_norm), not a tied Linear
        self.containers = {m[:i] for m in owned for i, c in enumerate(m) if c == "."}
        self.moe_parents = {
            m[: m.index(".experts.")] if ".experts." in m else ""
            for m in owned
            if ".experts." in m or m.startswith("experts.")
        }


def _module(
    name: str,
    names: tuple[str, ...],
    tensors: Mapping[str, tuple[str, Sequence[int]]],
    context: _Context,
) -> Module:
    weight = _weight_of(name, names)
    _refuse_fused_experts(name, names, tensors)
    if weight is not None:
        kind = _kind(name, tuple(tensors[weight][1]), context)
    elif (
        f"{name}.bias" in names
        and _is_lm_head(name.split("."))
        and (name not in context.containers)
    ):
        kind = LINEAR  # an output head whose weight is tied to the embedding: bias only
    else:
        kind = OTHER
    return Module(name, kind, _role(name, kind, context), weight, names)


def _weight_of(name: str, names: tuple[str, ...]) -> str | None:
    prefix = f"{name}." if name else ""
    # pack-quantized stores `weight_packed` instead: qcli classifies its own output too
    for leaf in (layout.WEIGHT, layout.PACKED):
        if prefix + leaf in names:
            return prefix + leaf
    return None


def _kind(name: str, shape: tuple[int, ...], context: _Context) -> str:
    leaf = _leaf(name)
    if len(shape) == 1:
        return NORM if _NORM_LEAF.search(leaf) else OTHER
    if len(shape) >= 3:
        # fused 3-D expert weights were refused before this point; what is left is a
        # convolution, unless it is a table of position embeddings (Kimi-K2.5's pos_emb)
        position_table = "emb" in leaf.lower() and "patch" not in leaf.lower()
        return OTHER if position_table else CONV
    if len(shape) != 2:
        return OTHER
    override = next((_MODEL_TYPE_LEAVES[(t, leaf)] for t in context.model_types
                     if (t, leaf) in _MODEL_TYPE_LEAVES), None)  # fmt: skip
    if override:
        return override
    if _is_embedding(name, shape, context):
        return EMBEDDING
    if leaf in _CONV1D_LEAVES and context.model_types & _CONV1D_MODEL_TYPES:
        return CONV1D
    return LINEAR


def _is_embedding(name: str, shape: tuple[int, ...], context: _Context) -> bool:
    leaf = _leaf(name).lower()
    if leaf in _LINEAR_DESPITE_NAME or _EXPERT_INDEX.search(name + "."):
        return False
    if leaf in _EMBEDDING_LEAVES:
        return True
    if "emb" not in leaf or any(word in leaf for word in _LINEAR_WORDS):
        return False
    # An unfamiliar embedding-like name: believe it only when the table's shape is one
    # the config announces (a vocabulary or position count, or a hidden size).
    rows, dim = shape
    if rows in context.sizes or rows - 2 in context.sizes or dim in context.sizes:
        return True
    raise UnsupportedArchitecture(
        f"cannot tell whether {name} {list(shape)} is an Embedding or a Linear: "
        "its name says embedding but no size in config.json matches its shape"
    )


def _role(name: str, kind: str, context: _Context) -> str | None:
    parts = name.lower().split(".") if name else []
    if any(any(w in p for w in _AUDIO_WORDS) for p in parts):
        return "audio"
    if any(p in _VISION_PARTS or any(w in p for w in _VISION_WORDS) for p in parts):
        return "vision"
    if kind == EMBEDDING:
        return "embedding"
    if kind in (LINEAR, CONV1D) and _is_lm_head(parts):
        return "lm_head"
    if kind == LINEAR and parts and parts[0] in _CLASSIFIER_HEADS:
        return "classifier"
    if kind == LINEAR and _is_router(name, context):
        return "router"
    if _EXPERT_INDEX.search(name + "."):
        return "expert"
    return _block_role(parts[:-1])


def _is_lm_head(parts: list[str]) -> bool:
    leaf = parts[-1]
    if leaf in _LM_HEAD_LEAVES:
        return True
    # InternLM2's `output`, RWKV's `head`, ModernBERT-decoder's `decoder`: at the top only
    if leaf in ("output", "head", "decoder") and len(parts) == 1:
        return True
    # BERT-style masked-LM heads, XLM's prediction layer
    return parts[-2:] in (["predictions", "decoder"], ["pred_layer", "proj"])


def _is_router(name: str, context: _Context) -> bool:
    parent, _, leaf = name.rpartition(".")
    if leaf == "shared_expert_gate":
        return True
    if _leaf(parent) == "router":  # a linear inside a router block: GraniteMoe's router.layer
        return True
    return leaf in _ROUTER_LEAVES and parent in context.moe_parents


def _block_role(parents: list[str]) -> str | None:
    # attention first: BERT's `attention.output.dense` sits in an `output` block too
    if any(part in _ATTENTION_PARTS for part in parents):
        return "attention"
    if any(part in _MLP_PARTS for part in parents):
        return "mlp"
    return None


# --- refusals ---------------------------------------------------------------------------


def _refuse_foreign_quantization(config: Mapping[str, Any]) -> None:
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
    if method and method != "compressed-tensors":
        raise UnsupportedArchitecture(
            f"checkpoint is already quantized with {method}; qcli needs a dense source"
        )


def _refuse_fused_experts(
    name: str, names: tuple[str, ...], tensors: Mapping[str, tuple[str, Sequence[int]]]
) -> None:
    parts = name.split(".") if name else []
    # 1-D tensors on an experts container (a router's score-correction bias) are no weights
    matrices = [t for t in names if len(tensors[t][1]) >= 2]
    for i, part in enumerate(parts):
        indexed = i + 1 < len(parts) and re.fullmatch(r"(expert_)?\d+", parts[i + 1])
        if part == "experts" and not indexed and matrices:
            raise UnsupportedArchitecture(
                f"MoE experts stored fused under {name} ({', '.join(map(_leaf, matrices))}) in a"
                " layout qcli does not know; it reads experts stored per expert"
                " (experts.<i>.<proj>.weight) and splits Llama 4's and GraniteMoE's fused ones"
            )
    moe_like = any("expert" in p or p in ("block_sparse_moe", "moe") for p in parts)
    for tensor in names:
        shape = tensors[tensor][1]
        if (
            _leaf(tensor) == "weight"
            and len(shape) == 3
            and (moe_like or _leaf(name) in ("input_linear", "output_linear"))
        ):
            raise UnsupportedArchitecture(
                f"{tensor} {list(shape)} holds every expert of an MoE layer in one 3-D tensor,"
                " in a layout qcli does not know; it reads experts stored per expert and splits"
                " Llama 4's and GraniteMoE's fused ones"
            )


# --- fused groups -----------------------------------------------------------------------

# Sibling modules that vLLM loads into one fused layer (its `packed_modules_mapping`):
# all parts must share one scheme (all quantized alike, or all ignored).
_FUSED_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),  # -> qkv_proj (Llama, Mistral, Qwen, OPT, CLIP, SigLIP...)
    ("query", "key", "value"),  # -> qkv_proj (BERT and relatives)
    ("q", "k", "v"),  # -> qkv_proj (T5)
    ("gate_proj", "up_proj"),  # -> gate_up_proj
    ("w1", "w3"),  # -> gate_up_proj (InternLM2, DeepSeek-V4 shared experts)
    ("q_a_proj", "kv_a_proj_with_mqa"),  # -> fused_qkv_a_proj (DeepSeek-V2/V3 with q_lora)
)
_EXPERT_MODULE = re.compile(r"^(?P<parent>.*\.experts|experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")


def fused_groups(modules: Iterable[str]) -> list[tuple[str, ...]]:
    """The sets of modules vLLM fuses into one layer, among the given module names.

    Sibling groups (q/k/v, gate/up, ...) count only when every part is present. All
    experts of one MoE layer (`<parent>.experts.<i>.<proj>`) form one group: vLLM's
    FusedMoE takes a single scheme for all of them.
    """
    names = list(dict.fromkeys(modules))
    present = set(names)
    groups: list[tuple[str, ...]] = []
    experts: dict[str, list[str]] = {}
    seen_parents: set[str] = set()
    for name in names:
        match = _EXPERT_MODULE.match(name)
        if match:
            experts.setdefault(match["parent"], []).append(name)
            continue
        parent = _parent(name)
        if parent in seen_parents:
            continue
        seen_parents.add(parent)
        groups.extend(_sibling_groups(parent, present))
    for members in experts.values():
        groups.append(tuple(sorted(members, key=_expert_order)))
    return groups


def _sibling_groups(parent: str, present: set[str]) -> list[tuple[str, ...]]:
    prefix = f"{parent}." if parent else ""
    found = []
    for leaves in _FUSED_SIBLINGS:
        group = tuple(prefix + leaf for leaf in leaves)
        if all(member in present for member in group):
            found.append(group)
    return found


def _expert_order(name: str) -> tuple[str, int, str]:
    match = _EXPERT_MODULE.match(name)
    assert match is not None
    return match["parent"], int(match["index"]), match["proj"]


# --- helpers ----------------------------------------------------------------------------


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def model_types(config: Mapping[str, Any]) -> set[str]:
    """model_type of the config and of every nested sub-config."""
    found = set()
    if isinstance(config.get("model_type"), str):
        found.add(config["model_type"])
    for value in config.values():
        if isinstance(value, Mapping):
            found |= model_types(value)
    return found


def _config_ints(config: Mapping[str, Any]) -> frozenset[int]:
    """Every positive integer in the config tree: vocabulary, position and hidden sizes."""
    found: set[int] = set()
    stack: list[Any] = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add(value)
    return frozenset(found)
