"""The output head over the vocabulary, its tie to the input embedding, and that table.

Written once for every reader: the planner (quantize lm_head, or untie it), the checks (does
the written config quantize the head the loaders will build?), verify (a tied source's lm_head
is its embedding table) and inspect. Headers and config only; no torch.

A tied lm_head has no tensors on disk, yet every loader builds it as an nn.Linear that reuses
the embedding table: qcli calls it the *virtual* head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qcli.kinds import EMBEDDING, LINEAR, Module

LM_HEAD = "lm_head"  # the virtual head's name: what transformers and vLLM call it


@dataclass(frozen=True)
class Head:
    """lm_head as the loaders see it."""

    name: str | None  # module name; None when the model has no output head
    module: Module | None  # the module on disk; None for a virtual (tied) head
    tied: bool  # the config ties the head to the input embedding
    embedding: str | None  # the input embedding table's weight tensor, when there is one

    @property
    def virtual(self) -> bool:
        """Tied, with no lm_head tensors on disk: loaders reuse the embedding table."""
        return self.name is not None and self.module is None

    @property
    def on_disk(self) -> bool:
        return self.module is not None


def resolve(
    modules: Mapping[str, Module],
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[str, Sequence[int]]],
) -> Head:
    """Which module is lm_head (a real one, or the virtual head of a tied model), from the
    classified modules, config.json and the tensors' (dtype, shape)."""
    tied = tied_embeddings(config)
    heads = [m for m in modules.values() if m.role == "lm_head" and m.kind == LINEAR]
    embedding = embedding_table(modules, config, shapes)
    if heads:
        return Head(heads[0].name, heads[0], tied, embedding)
    if tied and embedding is not None:
        return Head(LM_HEAD, None, tied, embedding)
    return Head(None, None, tied, embedding)


def embedding_table(
    modules: Mapping[str, Module],
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[str, Sequence[int]]],
) -> str | None:
    """The input embedding's weight tensor: the table a tied lm_head reuses (one row per
    vocabulary entry, when config.json says how many)."""
    vocab = text_config(config).get("vocab_size")
    for m in modules.values():
        if m.kind == EMBEDDING and m.role == "embedding" and m.weight:
            if vocab is None or shapes[m.weight][1][0] == vocab:
                return m.weight
    return None


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's config: `text_config` of a composite model, else the config."""
    sub = config.get("text_config")
    return sub if isinstance(sub, Mapping) and sub else config  # a malformed one is ignored


def untie(config: dict[str, Any]) -> None:
    """Mark a config (and its text sub-config) untied: lm_head has weights of its own."""
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False


# --- tie_word_embeddings, as transformers 5.24 reads it ----------------------------------

# Model types whose transformers 5.24 config defaults tie_word_embeddings to True; every
# other type defaults to False. tests/interop checks this against the installed library.
_TIED_BY_DEFAULT = frozenset(
    """
    albert aya_vision bart bert bert-generation big_bird bigbird_pegasus biogpt blenderbot
    blenderbot-small blip blip_text_model bloom camembert canary cohere cohere2 cohere2_moe
    cohere2_vision cohere_compass_text convbert cpmant csm ctrl d_fine dab-detr data2vec-text
    deberta deberta-v2 deepseek_vl deepseek_vl_hybrid deformable_detr deimv2 diffusion_gemma
    diffusion_gemma_text distilbert electra ernie ernie4_5 ernie4_5_moe ernie4_5_vl_moe
    ernie4_5_vl_moe_text esm falcon falcon_mamba flaubert flava florence2 fnet fun_asr_nano
    funnel gemma gemma2 gemma3 gemma3_text gemma3n gemma3n_text gemma4 gemma4_text
    gemma4_unified gemma4_unified_assistant gemma4_unified_text glmasr got_ocr2 gpt-sw3 gpt2
    gpt_bigcode gpt_neo gpt_neox_japanese granite_docling granite_docling_text granite_speech
    granite_speech5_ctc granite_speech_plus granite_swa grounding-dino gte hunyuan_vl
    hunyuan_vl_text hyperclovax_vision_v2 ibert internvl janus jetmoe jina_embeddings_v3
    kimi_k25 kosmos-2 kosmos-2.5 kosmos_2_5_text_model kosmos_2_text_model lara_mini layoutlm
    led lfm2 lfm2_moe lfm2_vl lfm3 lfm3_vl lighton_ocr longformer longt5 luke lxmert m2m_100
    mamba marian mbart megatron-bert mimi mimi_decoder mimi_encoder minicpm3 minicpm_ocr
    mistral3 mm-grounding-dino mobilebert modernbert modernbert-decoder moonshine
    moss_transcribe_diarize mpnet mpt mra mt5 mvp neomme nllb-moe nomic_bert nystromformer
    openai-gpt opt ovis2 paddleocr_vl paddleocr_vl_text paligemma pe_audio_video pegasus
    pegasus_x plbart pop2piano pp_chart2table pp_doclayout_v3 pp_doclayout_v4 prophetnet
    qwen2_5_omni_text qwen3_asr qwen3_vl_moe_text recurrent_gemma roberta roberta-prelayernorm
    roc_bert roformer rt_detr_v2 sam sam_hq seamless_m4t seamless_m4t_v2 shieldgemma2 smollm3
    speech_to_text speecht5 squeezebert starcoder2 switch_transformers t5 t5_gemma_module
    t5gemma t5gemma2 t5gemma2_decoder t5gemma2_encoder t5gemma2_text tapas trocr udop umt5
    vaultgemma vilt visual_bert voxtral_realtime whisper xglm xlm xlm-roberta xlm-roberta-xl
    xlnet xmod yoso youtu zamba zamba2 zaya
    """.split()
)

# Composite configs with no top-level tie_word_embeddings: their language model is a
# sub-model tied (or not) by its own sub-config. Type -> (that sub-config's key, the
# value when the sub-config says nothing).
_TIED_IN_SUBCONFIG = {
    "audioflamingo3": ("text_config", False), "blip-2": ("text_config", True),
    "instructblip": ("text_config", True), "instructblipvideo": ("text_config", True),
    "jev": ("text_config", False), "mllama": ("text_config", False),
    "muse_glimmer": ("text_config", False), "muse_spark": ("text_config", False),
    "musicflamingo": ("text_config", False), "nemo_speechlm": ("text_config", False),
    "nemotron_h_omni": ("text_config", False), "omniasr": ("text_config", False),
    "pe_audio": ("text_config", True), "pe_video": ("text_config", True),
    "pp_formulanet": ("text_config", False), "qwen2_audio": ("text_config", False),
    "step3p7": ("text_config", False), "vibevoice_asr": ("text_config", False),
    "vision-text-dual-encoder": ("text_config", True), "voxtral": ("text_config", False),
    "encoder-decoder": ("decoder", True), "vision-encoder-decoder": ("decoder", True),
    "speech-encoder-decoder": ("decoder", True),
}  # fmt: skip

# Encoder-decoder wrappers whose decoder sub-model ties itself by its own config; the
# wrapper's top-level flag is about encoder/decoder sharing (and forced False by the
# vision/speech ones).
_DECODER_DECIDES = frozenset(
    {"encoder-decoder", "vision-encoder-decoder", "speech-encoder-decoder"}
)

# Composite configs that, for configs saved before transformers 5, copy a True
# text_config.tie_word_embeddings up to the top level (see LlavaConfig.__post_init__).
_FORWARDS_TEXT_TIE = frozenset(
    """
    fast_vlm glm4v glm4v_moe glm_ocr hunyuan_vl llava llava_next_video llava_onevision
    minimax_m3_vl paddleocr_vl perception_lm pix2struct qwen2_5_vl qwen2_vl shieldgemma2
    vibevoice video_llama_3
    """.split()
)


def tied_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether the loaded model ties its output head to the input embedding table.

    Follows transformers 5.24: an explicit `tie_word_embeddings` wins; otherwise the
    default of the config class of `model_type`. Composite configs without a top-level
    value (BLIP-2, Mllama, ...) and encoder-decoder wrappers defer to the sub-config of their
    language model, and some vision-language configs (Llava, Qwen2-VL, ...) take a True from their
    `text_config` for configs saved before transformers 5.
    """
    model_type = config.get("model_type")
    top_level = "tie_word_embeddings" in config and model_type not in _DECODER_DECIDES
    if not top_level and model_type in _TIED_IN_SUBCONFIG:
        key, default = _TIED_IN_SUBCONFIG[model_type]
        sub = _sub_config(config, key)
        return tied_embeddings(sub) if sub is not None else default
    if "tie_word_embeddings" in config:
        tied = bool(config["tie_word_embeddings"])
    else:
        tied = model_type in _TIED_BY_DEFAULT
    text_config = _sub_config(config, "text_config")
    if not tied and model_type in _FORWARDS_TEXT_TIE and text_config is not None:
        tied = tied_embeddings(text_config)
    return tied


def _sub_config(config: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """config[key] if it is a sub-config that says something about tying."""
    sub = config.get(key)
    if isinstance(sub, Mapping) and _says_anything(sub):
        return sub
    return None


def _says_anything(config: Mapping[str, Any]) -> bool:
    return "tie_word_embeddings" in config or "model_type" in config
