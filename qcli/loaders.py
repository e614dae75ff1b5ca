"""What the real loaders do with a checkpoint that is valid but that one of them cannot run.

Each fact was measured here (tests/interop) and is said once, in the words users read in
quantize's warnings, verify's findings and eval's errors.
"""

from __future__ import annotations

from collections.abc import Set

from qcli.experts import GRANITE, LLAMA4

# transformers' MoE expert loader (integrations/compressed_tensors.py) dequantizes fp8 and
# `weight_packed` experts while merging them into its fused 3-D parameters, and nothing else:
# under an int-quantized config, per-expert `weight` tensors reach its Concatenate empty,
# int8 or dense alike (measured: Qwen3-MoE W8A8 with every expert kept dense fails too).
INT8_EXPERTS = (
    "transformers 5.24 (with compressed-tensors 0.20) cannot load a W8A8 (int-quantized)"
    " checkpoint of an MoE whose experts are stored per expert, whether they are quantized or"
    " kept dense: it stops with 'Concatenate on tensors destined for …experts.gate_up_proj'."
    " The checkpoint is valid: vLLM loads it (on its CPU build with experts dense; quantized"
    " experts need a GPU, or a CPU with AMX); for transformers, use FP8_DYNAMIC or W8A16"
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


def transformers_experts(model_types: Set[str], fmt: str | None, quantized: bool) -> str | None:
    """Why transformers cannot load a checkpoint's MoE experts, or None.

    `model_types`: the config's (qcli.kinds.model_types); `fmt`: the config's
    compressed-tensors format; `quantized`: whether any expert is stored quantized. Llama 4
    is the exception to INT8_EXPERTS (with a quantization config transformers builds its
    experts as Linear modules, which load any scheme); GraniteMoE's limit is the split, which
    qcli makes only for quantized experts.
    """
    if model_types & GRANITE:
        return GRANITE_SPLIT if quantized else None
    if model_types & LLAMA4:
        return None
    return INT8_EXPERTS if fmt == "int-quantized" else None
