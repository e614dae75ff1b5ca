"""What the real loaders do with a checkpoint that is valid but that one of them cannot run.

Each fact was measured here (tests/interop) and is said once, in the words users read in
quantize's warnings, verify's findings and eval's errors.
"""

from __future__ import annotations

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
