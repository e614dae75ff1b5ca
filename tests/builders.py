"""The checkpoints tests are made of, in one place.

- :func:`llama_checkpoint`: a one-layer Llama written with safetensors alone (no
  transformers): milliseconds, for plans, refusals and the reliability zoo;
- :func:`make_model`: tiny models saved by transformers itself (seeded random weights), for
  everything that must load back in a real loader.

Random weights say nothing about accuracy: tests of accuracy use real trained weights
(tests/interop/test_trained_encoder.py, the SmolLM2 fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama"

LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=256,
)


def make_model(kind: str, dest: Path, *, max_shard_size: str | None = None, seed: int = 0) -> Path:
    """Save a tiny random model of `kind` ("llama", "qwen2" (tied)) with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(**LLAMA, tie_word_embeddings=False)
    elif kind == "llama-tied":
        cfg = LlamaConfig(**LLAMA, tie_word_embeddings=True)
    elif kind == "qwen2":
        cfg = Qwen2Config(**LLAMA, tie_word_embeddings=True)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dest, **kwargs)
    return dest


H, I, V = 64, 128, 256  # noqa: E741  (hidden, intermediate, vocab)


def llama_checkpoint(
    tmp: Path, *, tied: bool = False, extra: dict | None = None, cfg: dict | None = None
) -> Path:
    """A one-layer Llama written tensor by tensor (random, no transformers): fast, for plans,
    refusals and the reliability zoo. `extra` adds or replaces tensors, `cfg` config keys."""
    ts = {"model.embed_tokens.weight": torch.randn(V, H).bfloat16()}
    p = "model.layers.0"
    for n, shape in {
        "self_attn.q_proj": (H, H),
        "self_attn.k_proj": (H, H),
        "self_attn.v_proj": (H, H),
        "self_attn.o_proj": (H, H),
        "mlp.gate_proj": (I, H),
        "mlp.up_proj": (I, H),
        "mlp.down_proj": (H, I),
    }.items():
        ts[f"{p}.{n}.weight"] = torch.randn(*shape).bfloat16()
    ts[f"{p}.input_layernorm.weight"] = torch.ones(H).bfloat16()
    ts["model.norm.weight"] = torch.ones(H).bfloat16()
    if not tied:
        ts["lm_head.weight"] = torch.randn(V, H).bfloat16()
    ts.update(extra or {})
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(ts, tmp / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": I,
        "vocab_size": V,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "tie_word_embeddings": tied,
        **(cfg or {}),
    }
    (tmp / "config.json").write_text(json.dumps(config))
    return tmp


def load_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def moe_checkpoint(tmp: Path, *, experts: int = 4, layers: int = 2) -> Path:
    """A Qwen3-MoE checkpoint written tensor by tensor: experts stored one by one
    (`mlp.experts.<i>.{gate,up,down}_proj`), routers at `mlp.gate`, as its releases do."""
    ts = {
        "model.embed_tokens.weight": torch.randn(V, H).bfloat16(),
        "model.norm.weight": torch.ones(H).bfloat16(),
        "lm_head.weight": torch.randn(V, H).bfloat16(),
    }
    for n in range(layers):
        p = f"model.layers.{n}"
        for proj, shape in {
            "q_proj": (H, H),
            "k_proj": (H, H),
            "v_proj": (H, H),
            "o_proj": (H, H),
        }.items():
            ts[f"{p}.self_attn.{proj}.weight"] = torch.randn(*shape).bfloat16()
        ts[f"{p}.mlp.gate.weight"] = torch.randn(experts, H).bfloat16()
        for e in range(experts):
            for proj, shape in {
                "gate_proj": (I, H),
                "up_proj": (I, H),
                "down_proj": (H, I),
            }.items():
                ts[f"{p}.mlp.experts.{e}.{proj}.weight"] = torch.randn(*shape).bfloat16()
        ts[f"{p}.input_layernorm.weight"] = torch.ones(H).bfloat16()
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(ts, tmp / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": H,
        "moe_intermediate_size": I,
        "num_experts": experts,
        "num_experts_per_tok": 2,
        "vocab_size": V,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "tie_word_embeddings": False,
    }
    (tmp / "config.json").write_text(json.dumps(config))
    return tmp


def add_tokenizer(folder: Path, vocab: int = 512, bos: bool = True) -> Path:
    """A byte-level BPE tokenizer of `vocab` tokens trained on qcli's corpus, saved into a
    model folder, so that tiny random models can be scored on text (eval's structure tests;
    their numbers say nothing about accuracy)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qcli.evaluation import default_corpus

    specials = ["<|endoftext|>", "<s>"] if bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([default_corpus()[0]], trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        **({"bos_token": "<s>"} if bos else {}),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# Qwen3 whose every Linear is a partial number of 128 x 128 blocks (192 = 1.5 blocks, ...),
# as real releases have (DeepSeek-R1's kv_a_proj_with_mqa is [576, 7168]).
QWEN3_ODD = dict(
    hidden_size=192,
    intermediate_size=320,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=64,
    vocab_size=512,
    max_position_embeddings=256,
)


def qwen3_odd(dest: Path, seed: int = 0) -> Path:
    """A tiny random Qwen3 saved by transformers, its layers not multiples of 128."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(**QWEN3_ODD, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(dest)
    return dest


def block_fp8_release(
    dense: Path, dest: Path, block: tuple[int, int] = (128, 128), scale_dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """Write `dense` as DeepSeek and Qwen publish their FP8 releases: every `*_proj.weight`
    fp8 e4m3 with float32 `weight_scale_inv` over `block` (edge blocks partial, zero-padded
    for their scale, README_WEIGHTS.md of DeepSeek-V3); embeddings, norms, routers and lm_head
    stay bf16. Returns the dense float32 weights the release stands for, by DeepSeek's
    formula ``w = q * scale_inv`` per block (computed here on padded blocks, apart from
    qcli.dequant)."""
    from safetensors.torch import load_file

    b0, b1 = block
    src = load_file(dense / "model.safetensors")
    out, decoded = {}, {}
    for name, w in src.items():
        if not (name.endswith("_proj.weight") and w.dim() == 2):
            out[name] = w
            continue
        rows, cols = w.shape
        pr, pc = -rows % b0, -cols % b1
        blocks = torch.nn.functional.pad(w.float(), (0, pc, 0, pr)).view(
            (rows + pr) // b0, b0, (cols + pc) // b1, b1
        )
        amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
        scale = (amax / 448.0).to(scale_dtype)
        q = (blocks / scale.float()[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        dq = q.float() * scale.float()[:, None, :, None]
        out[name] = q.reshape(rows + pr, cols + pc)[:rows, :cols].contiguous()
        out[name.removesuffix("weight") + "weight_scale_inv"] = scale
        decoded[name] = dq.reshape(rows + pr, cols + pc)[:rows, :cols].contiguous()
    dest.mkdir(parents=True, exist_ok=True)
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    config = load_config(dense)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [b0, b1],
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return decoded


def fused_moe(kind: str, dest: Path, seed: int = 0) -> Path:
    """A tiny random MoE whose experts transformers saves fused (3-D): "llama4" (Llama 4
    text, `experts.gate_up_proj` [E, H, 2I]) or "granitemoe" (`input_linear` [E, 2I, H])."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(
        vocab_size=256, hidden_size=128, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, tie_word_embeddings=False,
    )  # fmt: skip
    if kind == "llama4":
        cfg = T.Llama4TextConfig(
            **common, intermediate_size_mlp=96, num_hidden_layers=2, head_dim=64,
            num_experts_per_tok=1, interleave_moe_layer_step=1,
        )  # fmt: skip
        model = T.Llama4ForCausalLM(cfg)
    elif kind == "granitemoe":
        cfg = T.GraniteMoeConfig(**common, num_hidden_layers=2, num_experts_per_tok=2)
        model = T.GraniteMoeForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.to(torch.bfloat16).save_pretrained(dest)
    return dest


def bin_model(kind: str, dest: Path, *, shards: int = 1, seed: int = 0) -> Path:
    """:func:`make_model` re-saved as transformers 4's PyTorch format: torch.save of the
    loaded model's state dict (a tied head shares its embedding's storage, as there) into
    pytorch_model.bin, or `shards` files with pytorch_model.bin.index.json. No safetensors."""
    from transformers import AutoModelForCausalLM

    make_model(kind, dest, seed=seed)
    state = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16).state_dict()
    for f in [*dest.glob("*.safetensors"), dest / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    if shards == 1:
        torch.save(state, dest / "pytorch_model.bin")
        return dest
    names = list(state)
    wmap = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i * len(names) // shards : (i + 1) * len(names) // shards]
        torch.save({n: state[n] for n in part}, dest / shard)
        wmap.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": wmap}
    (dest / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return dest


def to_bin(folder: Path) -> Path:
    """`folder`'s model.safetensors re-saved in place as pytorch_model.bin (torch.save)."""
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def rewrite_bin(path: Path, *, pickle: bytes | None = None, compress: bool = False) -> Path:
    """The torch zip `path` rewritten member by member: data.pkl replaced by `pickle`, or
    every storage deflated (torch.save stores them uncompressed)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = [(m.filename, z.read(m)) for m in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            if pickle is not None and name.endswith("/data.pkl"):
                data = pickle
            deflate = compress and "/data/" in name
            z.writestr(name, data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return path


def vlm(kind: str, dest: Path, seed: int = 0) -> Path:
    """A tiny random vision-language model saved by transformers 5, which writes the legacy
    names on disk: "llava" (`language_model.model.layers...`) or "qwen2_vl"
    (`model.layers...`, `visual.blocks...`)."""
    import transformers as T

    torch.manual_seed(seed)
    text = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    if kind == "llava":
        vision = T.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=28, patch_size=14, projection_dim=32,
        )  # fmt: skip
        cfg = T.LlavaConfig(
            text_config=T.LlamaConfig(**text), vision_config=vision, image_token_index=300,
            vision_feature_layer=-1,
        )  # fmt: skip
        model = T.LlavaForConditionalGeneration(cfg)
    elif kind == "qwen2_vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 2, 2]}
        vision = dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, in_channels=3, temporal_patch_size=2,
        )  # fmt: skip
        cfg = T.Qwen2VLConfig(
            text_config=text, vision_config=vision, image_token_id=300, video_token_id=301,
            vision_start_token_id=302, tie_word_embeddings=False,
        )  # fmt: skip
        model = T.Qwen2VLForConditionalGeneration(cfg)
    else:
        raise ValueError(kind)
    model.to(torch.bfloat16).save_pretrained(dest)
    return dest
