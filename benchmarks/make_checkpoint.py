#!/usr/bin/env python3
"""Write a synthetic Llama-shaped bf16 checkpoint, streaming, one tensor at a time.

No transformers model is instantiated. Every tensor is generated from its own seeded
generator (seed + CRC32 of the tensor name), so a tensor's values do not depend on the
preset's other tensors or on the shard size, and the same command always writes the same
bytes. Shards are written by hand in the safetensors format (8-byte little-endian header
length, JSON header padded with spaces to a multiple of 8, then the raw tensor bytes in
header order), so peak memory is one tensor, whatever the checkpoint's size.

Output folder:
    config.json                      LlamaForCausalLM (or Qwen2ForCausalLM), bfloat16
    generation_config.json
    model-0000i-of-0000n.safetensors (or model.safetensors when one shard)
    model.safetensors.index.json     (when more than one shard)

Presets (bytes are decimal GB of tensor data):
    tiny  hidden 256,  inter 512,   vocab 1024,  2 layers, 4 heads / 2 kv   ~3.4 MB, 2 shards
    2g    hidden 2048, inter 8192,  vocab 32000, 16 layers, 16 heads / 8 kv ~2.28 GB, 2 shards
    7g    hidden 4096, inter 14336, vocab 32000, 15 layers, 32 heads / 8 kv ~7.07 GB, 4 shards
    llama3.2-1b  Llama-3.2-1B's shape: hidden 2048, inter 8192, vocab 128256, 16 layers,
                 32 heads / 8 kv, tied embeddings                  ~2.47 GB, 2 shards
    qwen2.5-0.5b Qwen2.5-0.5B's shape: Qwen2ForCausalLM, hidden 896, inter 4864,
                 vocab 151936, 24 layers, 14 heads / 2 kv, q/k/v biases, tied ~0.99 GB
    tiny-tied    tiny with tied embeddings (no lm_head tensor)      ~2.9 MB
    tiny-qwen2   tiny as Qwen2ForCausalLM (tied, q/k/v biases)      ~2.9 MB

Tied presets write no lm_head.weight and set tie_word_embeddings (the lm_head is the
embedding table, as in the releases they copy); the untied presets are unchanged.

Examples:
    python benchmarks/make_checkpoint.py --preset tiny /tmp/tiny-llama
    python benchmarks/make_checkpoint.py --preset 2g /root/bench/llama-2g
    python benchmarks/make_checkpoint.py --preset 7g --layers 16 /root/bench/llama-7g
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace

import torch

PRESETS = {
    # head_dim 64: vLLM's CPU attention accepts it; 2 shards to exercise the index path.
    "tiny": dict(
        hidden=256,
        intermediate=512,
        vocab=1024,
        layers=2,
        heads=4,
        kv_heads=2,
        shard_bytes=2 * 10**6,
    ),
    # Llama-3.2-1B body (hidden 2048, inter 8192, 16 layers) with a 32000 vocab.
    "2g": dict(
        hidden=2048,
        intermediate=8192,
        vocab=32000,
        layers=16,
        heads=16,
        kv_heads=8,
        shard_bytes=2 * 10**9,
    ),
    # Mistral-7B / Llama-3-8B layer shapes, 32000 vocab, 15 of the 32 layers.
    "7g": dict(
        hidden=4096,
        intermediate=14336,
        vocab=32000,
        layers=15,
        heads=32,
        kv_heads=8,
        shard_bytes=2 * 10**9,
    ),
    # Llama-3.2-1B exactly (128k vocabulary, tied), for decode benchmarks (decode_vllm.py).
    "llama3.2-1b": dict(
        hidden=2048,
        intermediate=8192,
        vocab=128256,
        layers=16,
        heads=32,
        kv_heads=8,
        shard_bytes=2 * 10**9,
        tied=True,
        rope_theta=500000.0,
    ),
    # Qwen2.5-0.5B exactly (152k vocabulary, tied, q/k/v biases).
    "qwen2.5-0.5b": dict(
        hidden=896,
        intermediate=4864,
        vocab=151936,
        layers=24,
        heads=14,
        kv_heads=2,
        shard_bytes=2 * 10**9,
        tied=True,
        arch="qwen2",
        rope_theta=1000000.0,
    ),
    # CI smoke versions of the two tied layouts (seconds in vLLM).
    "tiny-tied": dict(
        hidden=256,
        intermediate=512,
        vocab=1024,
        layers=2,
        heads=4,
        kv_heads=2,
        shard_bytes=2 * 10**6,
        tied=True,
    ),
    "tiny-qwen2": dict(
        hidden=256,
        intermediate=512,
        vocab=1024,
        layers=2,
        heads=4,
        kv_heads=2,
        shard_bytes=2 * 10**6,
        tied=True,
        arch="qwen2",
    ),
}
# presets small enough to write inside the repo (tests)
TINY = {"tiny", "tiny-tied", "tiny-qwen2"}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    shard_bytes: int
    # the fields below default to what the first presets write, so their files are unchanged
    tied: bool = False  # tie_word_embeddings: no lm_head.weight tensor
    arch: str = "llama"  # "llama" or "qwen2" (q/k/v biases, Qwen2's config.json)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes, in transformers' LlamaForCausalLM (Qwen2ForCausalLM) state_dict
    order."""
    h, i, kv = s.hidden, s.intermediate, s.kv_heads * s.head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, h))]
    for n in range(s.layers):
        p = f"model.layers.{n}."
        qkv = [("q_proj", h), ("k_proj", kv), ("v_proj", kv)]
        for proj, rows in qkv:
            specs.append((p + f"self_attn.{proj}.weight", (rows, h)))
            if s.arch == "qwen2":  # Qwen2 has biases on q, k and v only
                specs.append((p + f"self_attn.{proj}.bias", (rows,)))
        specs += [
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not s.tied:
        specs.append(("lm_head.weight", (s.vocab, h)))
    return specs


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One bf16 tensor from its own generator: N(0, 0.02) with a per-row scale in
    [0.5, 2) (so per-channel scales differ between rows), norms around 1, biases
    N(0, 0.02)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if name.endswith(".bias"):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
    if len(shape) == 1:
        return torch.empty(shape, dtype=torch.bfloat16).uniform_(0.8, 1.2, generator=g)
    w = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
    rows = torch.empty((shape[0], 1), dtype=torch.bfloat16).uniform_(0.5, 2.0, generator=g)
    return w.mul_(rows)


def nbytes(shape: tuple[int, ...]) -> int:
    n = 2
    for d in shape:
        n *= d
    return n


def plan_shards(specs, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in order, like transformers' max_shard_size (a tensor larger than the
    limit gets its own shard)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        b = nbytes(shape)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += b
    return shards


def write_shard(path: str, tensors, seed: int, fsync: bool) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        b = nbytes(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + b]}
        off += b
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for name, shape in tensors:
            t = make_tensor(name, shape, seed)
            f.write(memoryview(t.view(torch.uint8).numpy()))
            del t
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def config_json(s: Shape) -> dict:
    if s.arch == "qwen2":
        return qwen2_config(s)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": 4096,
        "mlp_bias": False,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": s.tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.0",
        "use_cache": True,
        "vocab_size": s.vocab,
    }


def qwen2_config(s: Shape) -> dict:
    """Qwen2.5's config.json keys (sliding window off, as in its releases)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": s.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": s.tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": s.vocab,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (keep big ones outside the repo)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--shard-gb", type=float, help="max shard size in GB (decimal)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fsync", action="store_true", help="fsync each shard")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    a = ap.parse_args(argv)

    s = Shape(**PRESETS[a.preset])
    if a.layers is not None:
        s = replace(s, layers=a.layers)
    if a.shard_gb is not None:
        s = replace(s, shard_bytes=int(a.shard_gb * 1e9))
    specs = tensor_specs(s)
    shards = plan_shards(specs, s.shard_bytes)
    total = sum(nbytes(sh) for _, sh in specs)
    n = len(shards)
    print(
        f"{a.preset}: {len(specs)} tensors, {total / 1e9:.3f} GB ({total / 2**30:.3f} GiB), "
        f"{n} shard(s); {asdict(s)}",
        file=sys.stderr,
    )
    if a.dry_run:
        return 0

    real = os.path.realpath(a.out)
    here = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
    if a.preset not in TINY and (real + os.sep).startswith(here + os.sep):
        print(
            f"refusing to write a {total / 1e9:.1f} GB checkpoint inside the repo", file=sys.stderr
        )
        return 2
    if os.path.exists(a.out):
        if not a.force:
            print(f"{a.out} exists (use --force)", file=sys.stderr)
            return 2
        shutil.rmtree(a.out)
    tmp = a.out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    weight_map = {}
    for k, tensors in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        write_shard(os.path.join(tmp, fname), tensors, a.seed, a.fsync)
        weight_map.update({name: fname for name, _ in tensors})
        print(
            f"  {fname}: {len(tensors)} tensors, {time.perf_counter() - t0:.1f}s", file=sys.stderr
        )
    if n > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_json(s), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.48.0"}, f)
    os.rename(tmp, a.out)
    dt = time.perf_counter() - t0
    print(f"wrote {a.out} in {dt:.1f}s ({total / 1e9 / dt:.2f} GB/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
