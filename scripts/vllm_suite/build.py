"""Step 1 and 2: the tiny seeded models, and their checkpoints made by `qcli quantize`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from vllm_suite.matrix import DERIVED, INIT_RANGE, MODELS, SEED, VOCAB


def make_model(name: str, dest: Path) -> None:
    """A tiny seeded random model, saved in bfloat16 with transformers."""
    import torch
    import transformers

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    common = dict(
        vocab_size=VOCAB,
        max_position_embeddings=256,
        initializer_range=INIT_RANGE,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-5,
    )
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, None),
        "qwen2": (transformers.Qwen2Config, None),
        "phi3": (transformers.Phi3Config, None),
        "qwen3_moe": (transformers.Qwen3MoeConfig, None),
        # the text model alone: Llama4Config would make the vision-language one
        "llama4": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM),
        "granitemoe": (transformers.GraniteMoeConfig, None),
        "qwen3": (transformers.Qwen3Config, None),
    }[arch]
    cfg = cfg_cls(**common, **spec)
    torch.manual_seed(SEED)
    if model_cls is None:
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        model = model_cls(cfg).to(torch.float32)
    with torch.no_grad():  # non-trivial norm weights, so a wrongly loaded norm shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = model.to(torch.bfloat16)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "qcli-suite-spec.json").write_text(json.dumps(_model_key(name)))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def make_derived(name: str, base: Path, dest: Path) -> None:
    """A source in another form, from the base model's folder: tests/builders.py makes it,
    the same way the unit tests do (.bin by torch.save, block-FP8 by DeepSeek's formula)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for tests/
    from tests.builders import block_fp8_release, to_bin

    form = DERIVED[name]["form"]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if form == "bin":
        shutil.copytree(base, tmp)
        to_bin(tmp)
    else:
        block_fp8_release(base, tmp)
    (tmp / "qcli-suite-spec.json").write_text(json.dumps(_model_key(name)))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _model_key(name: str) -> dict:
    import transformers

    if name in DERIVED:
        return dict(derived=DERIVED[name], base=_model_key(DERIVED[name]["base"]))
    return dict(
        spec=MODELS[name],
        seed=SEED,
        init=INIT_RANGE,
        vocab=VOCAB,
        transformers=transformers.__version__,
    )


def model_is_current(name: str, dest: Path) -> bool:
    f = dest / "qcli-suite-spec.json"
    return f.exists() and json.loads(f.read_text()) == _model_key(name)


def qcli_cmd() -> list[str]:
    """$QCLI if set, else the qcli installed for this python (so the suite
    tests the qcli that sits next to the transformers it compares with)."""
    env = os.environ.get("QCLI")
    if env:
        return shlex.split(env)
    exe = Path(sys.executable).parent / "qcli"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from qcli.cli import main; sys.exit(main())"]


def quantize(src: Path, out: Path, scheme: str, lm_head: bool, extra: list[str] = ()) -> None:
    cmd = qcli_cmd() + [
        "quantize",
        str(src),
        str(out),
        "--scheme",
        scheme,
        "--overwrite",
        "--quiet",
    ]
    if lm_head:
        cmd.append("--lm-head")
    cmd += extra
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")


def make_q63_variant(src_model: Path, ckpt: Path, dest: Path) -> None:
    """qcli's W8A8 with lm_head, weights kept within +-63 (`--int8-max 63`): exact on CPUs
    whose oneDNN int8 GEMM saturates. `ckpt` (the full-range twin) is not needed."""
    cmd = qcli_cmd() + [
        "quantize",
        str(src_model),
        str(dest),
        "--scheme",
        "W8A8",
        "--lm-head",
        "--int8-max",
        "63",
        "--overwrite",
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
