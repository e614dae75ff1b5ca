"""The engines a checkpoint is scored in: transformers (+ compressed-tensors), or vLLM.

An engine loads one model, gives the log-probabilities of every next token of a window, and
is closed before the next model loads: only one model is ever in memory.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from qcli import gemm
from qcli.errors import InputError, QcliError


def compute_dtype() -> torch.dtype:
    """bfloat16 where the CPU has bf16 arithmetic (AVX-512 BF16, AMX), float32 elsewhere:
    without it bf16 matmuls are emulated and slower than float32."""
    flags = _cpu_flags()
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class TransformersModel:
    """One checkpoint in transformers: AutoModelForCausalLM, compressed-tensors decompressing a
    quantized one as it loads (activations fake-quantized the way its scheme says)."""

    engine = "transformers"

    def __init__(self, path: Path, dtype: torch.dtype):
        try:
            import transformers
        except ImportError:
            raise InputError("qcli eval needs transformers: pip install transformers") from None
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        steady_malloc()
        self.path, self.dtype = path, dtype
        self.decoded = _block_fp8(path)
        try:
            # compressed-tensors draws tqdm bars while it (de)compresses: keep them off
            with contextlib.redirect_stderr(io.StringIO()):
                auto = transformers.AutoModelForCausalLM
                if self.decoded:
                    self.model = _load_decoded(transformers, path, dtype)
                else:
                    self.model = auto.from_pretrained(path, dtype=dtype)
        except QcliError:
            raise
        except Exception as e:  # transformers raises many types; the message is what matters
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"transformers cannot load {path}: {first}") from None
        self.model.eval()

    def describe(self) -> dict[str, Any]:
        """Which loader, dtype and kernels ran."""
        quantized = [
            m for m in self.model.modules() if getattr(m, "quantization_scheme", None) is not None
        ]
        kinds = sorted({type(m).__name__ for m in quantized})
        dynamic = any(m.quantization_scheme.input_activations is not None for m in quantized)
        dtype = str(self.dtype).removeprefix("torch.")
        kernel = f"{dtype} matmul"
        if self.decoded:
            kernel = f"block-fp8 weights decoded by qcli (as it re-quantizes them); {kernel}"
        if quantized:
            acts = "activations fake-quantized per token" if dynamic else "dense activations"
            kernel = (
                f"weights decompressed by compressed-tensors; {acts}; {dtype} matmul"
                f" ({', '.join(kinds)})"
            )
        return {
            "engine": self.engine,
            "loader": f"transformers {version('transformers')}"
            + (f", compressed-tensors {version('compressed-tensors')}" if quantized else "")
            + (", weights decoded by qcli" if self.decoded else ""),
            "dtype": str(self.dtype).removeprefix("torch."),
            "kernels": kernel,
            "quantized_modules": len(quantized),
        }

    @property
    def vocab(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-probabilities ``[len(ids), vocab]`` (float32) of the token after each position."""
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            logits = self.model(torch.tensor([ids])).logits[0].float()
        # in place: a window's logits are the largest tensor of a pass (512 x vocab floats)
        return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))

    def scored(self, ids: list[int], first: int) -> torch.Tensor:
        """Log-probabilities of the positions that predict the targets ids[first:]."""
        return self.logprobs(ids)[first - 1 : -1]

    def close(self) -> None:
        del self.model
        release_memory()


def _block_fp8(path: Path) -> bool:
    from qcli import dequant
    from qcli.tensors import open_checkpoint

    stored = dequant.find(open_checkpoint(path))
    return any(s.family == dequant.BLOCK_FP8 for s in stored.values())


def _load_decoded(transformers: Any, path: Path, dtype: torch.dtype) -> Any:
    """A block-fp8 release as the dense model it stands for: weights decoded by qcli.dequant
    (the values qcli re-quantizes), loaded through transformers as a dense state dict.

    Not transformers' own fp8 path: on CPU it infers the block size from the scale grid and
    so decodes releases whose layers are not multiples of 128 wrongly or leaves them random
    (transformers 5.24, finegrained_fp8.py). The state dict is the one model in memory:
    transformers takes its tensors as the parameters.
    """
    from qcli import dequant
    from qcli.tensors import FLOAT_DTYPES, open_checkpoint, read_rows, read_tensor

    ck = open_checkpoint(path)
    stored = dequant.find(ck)
    skip = dequant.consumed(stored)
    fds: dict[Path, int] = {}

    def fd(t: Any) -> int:
        if t.file not in fds:
            fds[t.file] = os.open(t.file, os.O_RDONLY)
        return fds[t.file]

    def read(t: Any, r0: int, r1: int) -> torch.Tensor:
        return read_rows(t, fd(t), r0, r1)

    state: dict[str, torch.Tensor] = {}
    try:
        for name, info in ck.tensors.items():
            if name in skip or name.endswith(".input_scale"):
                continue
            if name in stored:
                state[name] = dequant.dense(stored[name], read).to(dtype)
            else:
                t = read_tensor(info, fd(info))
                state[name] = t.to(dtype) if info.dtype in FLOAT_DTYPES else t
    finally:
        for fd in fds.values():
            os.close(fd)
    config = transformers.AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # the model class itself: the Auto class wants a folder to read, and this one's
    # weights are the ones decoded here
    cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def steady_malloc() -> None:
    """Large blocks straight from mmap, back to the OS on free (glibc's M_MMAP_THRESHOLD,
    fixed at 1 MB). By default glibc raises that threshold as big blocks come and go, and
    then keeps freed logits and activations in the heaps of torch's threads: a second model
    loaded after the first (or a window after the last) finds them still taken. Measured on
    SmolLM2-135M (benchmarks/eval_memory.py): the quantized pass peaked at 1.6-1.8 GB with
    the default, 1.2 GB with this, one model being 1.18 GB."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory() -> None:
    """Collect, and hand freed heap back to the OS (glibc's malloc_trim): a closed model's
    memory must be gone before the next model loads, not kept in malloc's free lists."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the collector's work is all there is
        pass


def cpu() -> dict[str, Any]:
    return {**gemm.cpu_features(), "bf16": torch.bfloat16 == compute_dtype()}
