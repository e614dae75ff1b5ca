"""Does a quantized checkpoint keep the compressed-tensors contract (shared/format.md)?

The read side of qcli: the config is turned back into decisions through the planner's own
matcher, head resolution and layout (qcli.rules, qcli.heads, qcli.layout), and compared with
the tensors. Config and tensors are checked from headers, plus the few small tensors whose
values the contract constrains (scales, packed shapes), read as raw bytes. No weight is
computed and torch is never imported: `qcli inspect` runs this on any checkpoint.

- checks.config: the quantization_config's own rules -> its groups;
- checks.modules: every module's stored state against the config's decision for it;
- checks.tensors: one quantized module's tensors against its format's layout;
- checks.files: index and file metadata; checks.raw: raw reads of small tensors.
"""

from __future__ import annotations

from pathlib import Path

from qcli import experts, kinds, layout
from qcli.checks.config import check_config, valid_entries
from qcli.checks.files import check_files
from qcli.checks.findings import (
    ERROR,
    READ_AS_FLOAT,
    WARNING,
    Contract,
    Finding,
    LmHead,
    QuantModule,
    sorted_findings,
)
from qcli.checks.modules import check_modules
from qcli.errors import CheckpointError, InputError
from qcli.tensors import INDEX_NAME, Checkpoint, open_checkpoint

__all__ = [
    "Contract",
    "ERROR",
    "Finding",
    "LmHead",
    "QuantModule",
    "WARNING",
    "check",
    "check_folder",
    "is_quantized",
    "sorted_findings",
]


def check_folder(folder: Path) -> tuple[Checkpoint | None, Contract]:
    """Open a checkpoint folder and check it; a malformed index or shard is a finding.

    Raises InputError only for input that is not a checkpoint at all (exit code 2).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a checkpoint folder: {folder}")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no config.json (not a Hugging Face checkpoint?)")
    if not (folder / INDEX_NAME).exists() and not any(folder.glob("*.safetensors")):
        raise InputError(f"{folder}: no *.safetensors weights found")
    try:
        ck = open_checkpoint(folder, keep_unlisted=False)  # what loaders see
    except CheckpointError as e:
        result = Contract()
        result.add(
            "files", str(folder), str(e), "loaders fail to open the checkpoint or miss tensors"
        )
        return None, result
    return ck, check(ck)


def quantized_tensors(ck: Checkpoint) -> list[str]:
    return [n for n, t in ck.tensors.items() if layout.is_quant_tensor(n, t.dtype)]


def is_quantized(ck: Checkpoint) -> bool:
    """Whether a checkpoint claims quantization or holds quantized tensors."""
    return bool((ck.config or {}).get("quantization_config")) or bool(quantized_tensors(ck))


def check(ck: Checkpoint) -> Contract:
    """Every contract check of a quantized checkpoint that headers and scales can decide."""
    result = Contract()
    check_files(ck, result)
    config = ck.config or {}
    qc = config.get("quantization_config")
    if not qc:
        stray = quantized_tensors(ck)
        result.add(
            "config.quantization_config",
            "config.json",
            "no quantization_config"
            + (f", but {len(stray)} tensors are quantized (e.g. {stray[0]})" if stray else ""),
            "loaders treat the checkpoint as dense: " + READ_AS_FLOAT,
        )
        return result
    if not isinstance(qc, dict):
        result.add(
            "config.quantization_config",
            "quantization_config",
            "is not an object",
            "transformers and vLLM fail to parse it",
        )
        return result
    groups = check_config(qc, result)
    dense_config = {k: v for k, v in config.items() if k != "quantization_config"}
    # experts a source stored fused and qcli kept dense are still fused here
    tensors, _ = experts.view(ck.tensors, dense_config)
    try:
        modules = kinds.classify({n: (t.dtype, t.shape) for n, t in tensors.items()}, dense_config)
    except kinds.UnsupportedArchitecture as e:
        raise InputError(f"cannot tell the checkpoint's module kinds: {e}") from None
    ignore = valid_entries(qc.get("ignore") or [])
    check_modules(tensors, config, modules, groups, ignore, result)
    return result
