"""What the real loaders do with a checkpoint that is valid but that one of them cannot run.

Each fact was measured here (tests/interop) and is said once, in the words users read in
quantize's warnings, verify's findings and eval's errors.
"""

from __future__ import annotations

from collections.abc import Set

from qcli.experts import GRANITE, LLAMA4

# transformers' MoE expert loader (integrations/compressed_tensors.py) dequantizes fp8 and
# `weight_packed` experts while merging them into its fused 3-D parameters, and nothing else:
# int8 `weight` + `weight_scale` experts reach its Concatenate empty.
INT8_EXPERTS = (
    "transformers 5.24 (with compressed-tensors 0.20) cannot load int8 (W8A8) MoE experts:"
    " it stops with 'Concatenate on tensors destined for …experts.gate_up_proj'. The"
    " checkpoint is valid and runs in vLLM on GPUs, or on CPUs with AMX (vLLM's CPU build"
    " has no int8 MoE kernel otherwise); for transformers, use FP8_DYNAMIC or W8A16"
)

# vLLM up to 0.32 (#52543) crashes building an fp8 weight-only lm_head.
FP8_WEIGHT_ONLY_HEAD = (
    "current vLLM cannot load an fp8 weight-only lm_head (it crashes; use FP8_DYNAMIC, or"
    " keep lm_head dense); transformers loads it"
)

# transformers 5.24 maps GraniteMoE's fused `input_linear` / `output_linear` tensors, and no
# per-expert names: split experts (the only way they can carry per-channel scales) load as
# unexpected keys, the fused parameters as missing (random). vLLM loads them.
GRANITE_SPLIT = (
    "transformers 5.24 cannot load GraniteMoE experts stored per expert (it maps only the"
    " fused input_linear/output_linear tensors: the experts would start from random values);"
    " vLLM loads them. For transformers, keep the experts dense (--ignore"
    " 're:.*block_sparse_moe\\.experts\\..*'): qcli then copies the fused tensors as they are"
)


def transformers_experts(model_types: Set[str], fmt: str | None) -> str | None:
    """Why transformers cannot load a checkpoint's quantized MoE experts, or None.

    `model_types`: the config's (qcli.kinds.model_types); `fmt`: the experts'
    compressed-tensors format. Llama 4 is the exception to INT8_EXPERTS: with a quantization
    config transformers builds its experts as Linear modules, which load any scheme.
    """
    if model_types & GRANITE:
        return GRANITE_SPLIT
    if model_types & LLAMA4:
        return None
    return INT8_EXPERTS if fmt == "int-quantized" else None
