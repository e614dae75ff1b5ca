"""Seeded activations for checking a layer: Gaussian, with the outlier channels real LLM
activations have (which is what makes W8A8 lossy)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

TOKENS = (1, 7, 64)  # decode, a short odd prefill, a full batch
FAST_TOKENS = (32,)
OUTLIER_GAIN = 16.0  # outlier channels' scale next to the Gaussian's 1
OUTLIER_EVERY = 128  # one outlier channel per this many input channels (at least one)


def activations(module: str, in_features: int, tokens: Sequence[int], seed: int = 0) -> list:
    """Seeded activation batches for one layer: float32 ``[t, in]`` for each t in `tokens`.

    Standard Gaussian, with one channel in OUTLIER_EVERY (at least one) scaled by
    OUTLIER_GAIN in every token: per-token activation scales are then set by the outliers,
    as in real LLM activations, which is what makes W8A8 lossy. Seeded by the module's name,
    so a layer gets the same batches whatever --layers selects.
    """
    g = torch.Generator().manual_seed((zlib.crc32(module.encode()) + 1_000_003 * seed) % 2**63)
    n_out = max(1, in_features // OUTLIER_EVERY)
    outliers = torch.randperm(in_features, generator=g)[:n_out]
    batches = []
    for t in tokens:
        x = torch.randn(t, in_features, generator=g)
        x[:, outliers] *= OUTLIER_GAIN
        batches.append(x)
    return batches
