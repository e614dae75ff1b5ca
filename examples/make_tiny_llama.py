"""Write the tiny example checkpoint that ships in examples/tiny-llama (about 3 MB).

A Llama with random weights (seeded), written with torch and safetensors alone so it can be
regenerated without transformers; the test suite checks that transformers loads it.
Head size 64, so vLLM's CPU attention accepts it too.

    python examples/make_tiny_llama.py [OUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tensors(cfg: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]

    def w(out: int, inp: int) -> torch.Tensor:
        return (torch.randn(out, inp, generator=g) * 0.02).to(torch.bfloat16)

    out = {"model.embed_tokens.weight": w(v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out[f"{p}.self_attn.q_proj.weight"] = w(h, h)
        out[f"{p}.self_attn.k_proj.weight"] = w(kv, h)
        out[f"{p}.self_attn.v_proj.weight"] = w(kv, h)
        out[f"{p}.self_attn.o_proj.weight"] = w(h, h)
        out[f"{p}.mlp.gate_proj.weight"] = w(i, h)
        out[f"{p}.mlp.up_proj.weight"] = w(i, h)
        out[f"{p}.mlp.down_proj.weight"] = w(h, i)
        out[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        out[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out["lm_head.weight"] = w(v, h)
    return out


def main(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors(CONFIG), dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": 2}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "tiny-llama")
