"""safetensors on disk, read side: validated headers, the checkpoint they describe, row reads.

Headers are parsed here rather than through the ``safetensors`` library so that `inspect` never
imports torch, and so every malformed file gets a one-line error naming the file and tensor
instead of a Rust panic. Writing shards is qcli.shards.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcli.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> (bytes per element, torch dtype attribute)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),  # power-of-two scales (DeepSeek-V3.1 on: ue8m0)
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
TORCH_TO_ST = {torch_name: st for st, (_, torch_name) in DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# A real header is a few MB at most (a 1000-layer MoE is ~20 MB); anything larger is corrupt.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Linux writes at most this many bytes per write(2) call.
_MAX_IO = 0x7FFFF000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte range, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first data byte in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """A local safetensors checkpoint folder, known from its headers alone."""

    folder: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None
    files: list[Path]
    sharded: bool
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # file name -> __metadata__
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def dtype_size(dtype: str) -> int:
    return DTYPES[dtype][0]


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return tuple(int(p) if p.isdecimal() else p for p in re.split(r"(\d+)", name))


def read_header(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Parse and validate one safetensors file's header; returns (__metadata__, tensors)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open forever
            raise CheckpointError(f"{path.name}: not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            hlen = header_length(path.name, f.read(8), size)
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror or e})") from None
    return parse_header(path, raw, size)


def header_length(name: str, head: bytes, size: int) -> int:
    """The header length in a file's first 8 bytes, checked against the file's `size`."""
    if len(head) < 8:
        raise CheckpointError(f"{name}: truncated file ({size} bytes, no header)")
    (hlen,) = struct.unpack("<Q", head[:8])
    if hlen > MAX_HEADER_BYTES or hlen > size - 8:
        raise CheckpointError(
            f"{name}: header length field says {hlen} bytes but the file has {size}"
            " (corrupt or truncated)"
        )
    return hlen


def parse_header(path: Path, raw: bytes, size: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Validate the header JSON `raw` of the `size`-byte safetensors file `path`.

    Separate from reading so that headers fetched over HTTP (qcli.hub) get the same checks.
    """
    name = path.name
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: header is not valid JSON ({e})") from None
    except RecursionError:  # e.g. [[[[...]]]] thousands deep
        raise CheckpointError(f"{name}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{name}: __metadata__ is not an object")
    base = 8 + len(raw)
    data_size = size - base
    tensors: dict[str, TensorInfo] = {}
    for tname, entry in header.items():
        tensors[tname] = _tensor_entry(name, tname, entry, path, base, data_size)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.nbytes)
    for (_, prev_end, prev), (start, _, cur) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise CheckpointError(f"{name}: tensors {prev!r} and {cur!r} overlap")
    return {str(k): str(v) for k, v in meta.items()}, tensors


def _tensor_entry(
    fname: str, tname: str, entry: Any, path: Path, base: int, data_size: int
) -> TensorInfo:
    where = f"{fname}: tensor {tname!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or object is unhashable
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{where}: bad shape {shape!r}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise CheckpointError(f"{where}: bad data_offsets {offs!r}")
    need = math.prod(shape) * dtype_size(dtype)
    if offs[1] - offs[0] != need:
        raise CheckpointError(
            f"{where}: {dtype}{shape} needs {need} bytes but its offsets span {offs[1] - offs[0]}"
        )
    if offs[1] > data_size:
        raise CheckpointError(
            f"{where}: data ends at byte {offs[1]} but the file holds {data_size} (truncated?)"
        )
    return TensorInfo(tname, dtype, tuple(shape), path, base + offs[0], base + offs[1])


def _load_json(path: Path, what: str) -> Any:
    if path.exists() and not path.is_file():  # a folder, or a FIFO that would block forever
        raise CheckpointError(f"{path.name}: not a regular file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path.name}: JSON nested too deeply") from None


# Keys whose type qcli's decisions depend on (tying, architecture tables): a wrong type must
# be named here rather than crash deep inside, or be silently misread (bool("no") is True).
_CONFIG_TYPES: dict[str, tuple[type, str]] = {
    "model_type": (str, "a string"),
    "tie_word_embeddings": (bool, "true or false"),
}


def check_config_types(config: Mapping[str, Any]) -> None:
    """Refuse a config.json (or nested sub-config) whose key qcli reads has the wrong type."""
    stack: list[tuple[Mapping[str, Any], str]] = [(config, "config.json")]
    while stack:  # not recursive: a hostile file can nest a thousand levels deep
        cfg, where = stack.pop()
        for key, (kind, expected) in _CONFIG_TYPES.items():
            value = cfg.get(key)
            if value is not None and not isinstance(value, kind):
                shown = json.dumps(value)[:40]
                raise CheckpointError(f"{where}: {key!r} is {shown}, expected {expected}")
        stack.extend(
            (v, f"{where} {k}")
            for k, v in cfg.items()
            if isinstance(v, dict) and k != "quantization_config"
        )


HeaderReader = Callable[[Path], tuple[dict[str, str], dict[str, TensorInfo]]]


def open_checkpoint(
    folder: Path,
    require_config: bool = True,
    read: HeaderReader | None = None,
    weight_files: Sequence[Path] | None = None,
    keep_unlisted: bool = True,
) -> Checkpoint:
    """Read every header of a safetensors checkpoint folder and check they agree (a folder
    without safetensors: its pytorch_model.bin, or their index, through qcli.torchbin).

    `read` and `weight_files` let qcli.hub build a Checkpoint whose shards are not on disk
    (headers fetched over HTTP): `read` replaces the local header reader, and `weight_files`
    the ``*.safetensors`` listing of a folder without an index. A tensor that a shard holds
    but the index does not list is kept with a warning (a quantize source keeps every
    weight); `keep_unlisted=False` leaves it out, as loaders do (what verify checks).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"not a checkpoint folder: {folder}")
    config = _read_config(folder, require_config)
    if (folder / INDEX_NAME).exists():
        files, tensors, metadata, warnings = _from_index(folder, INDEX_NAME, read, keep_unlisted)
        sharded = True
    else:
        listed = folder.glob("*.safetensors") if weight_files is None else weight_files
        files = sorted(listed, key=lambda p: natural_key(p.name))
        if not files and read is None and weight_files is None and _bin_weights(folder):
            # No safetensors at all: transformers then loads pytorch_model.bin; so does qcli.
            files, tensors, metadata, warnings, sharded = _from_bin(folder, keep_unlisted)
        else:
            if not files:
                _refuse_weightless(folder)
            tensors, metadata = _from_files(files, read or read_header)
            warnings, sharded = [], len(files) > 1
    if not tensors:
        raise CheckpointError(f"{folder}: the checkpoint holds no tensors")
    tensors = dict(sorted(tensors.items(), key=lambda kv: natural_key(kv[0])))
    return Checkpoint(folder, tensors, config, files, sharded, metadata, warnings)


def _read_config(folder: Path, required: bool) -> dict[str, Any] | None:
    cfg_path = folder / "config.json"
    if not cfg_path.exists() and not required:
        return None
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint?)")
    config = _load_json(cfg_path, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError("config.json: not a JSON object")
    check_config_types(config)
    return config


def _from_index(
    folder: Path,
    index_name: str,
    read: HeaderReader | None,
    keep_unlisted: bool,
    pattern: str = "*.safetensors",
    local_read: HeaderReader = read_header,
) -> tuple[list[Path], dict[str, TensorInfo], dict[str, dict[str, str]], list[str]]:
    """A sharded checkpoint: the index's weight map, checked against each shard's header.
    `pattern` globs the shards an index may leave out, `local_read` reads one on disk."""
    index = _load_json(folder / index_name, index_name)
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(f"{index_name}: no valid weight_map")
    for v in wmap.values():
        # a plain file name in this folder: never a path out of it ("../", "/etc/..."),
        # which a stranger's index could use to make qcli read any file
        if Path(v).name != v or v in (".", ".."):
            raise CheckpointError(f"{index_name} names shard {v!r}, not a file name")
    files = sorted({folder / v for v in wmap.values()}, key=lambda p: natural_key(p.name))
    headers, metadata = {}, {}
    for f in files:
        if read is None and not f.is_file():
            raise CheckpointError(f"{index_name} names shard {f.name}, which is missing")
        metadata[f.name], headers[f.name] = (read or local_read)(f)
    tensors: dict[str, TensorInfo] = {}
    for tname, shard in wmap.items():
        if tname not in headers[shard]:
            raise CheckpointError(f"{index_name} maps {tname!r} to {shard}, which lacks it")
        tensors[tname] = headers[shard][tname]
    warnings = _unlisted(headers, wmap, tensors if keep_unlisted else None, index_name)
    if read is None:
        listed = {f.name for f in files}
        warnings += [
            f"{p.name} is not named in {index_name}: not read (loaders skip it too)"
            for p in sorted(folder.glob(pattern), key=lambda p: natural_key(p.name))
            if p.name not in listed
        ]
    return files, tensors, metadata, warnings


def _bin_weights(folder: Path) -> bool:
    from qcli import torchbin

    return (folder / torchbin.INDEX_NAME).exists() or (folder / torchbin.SINGLE_NAME).exists()


def _from_bin(
    folder: Path, keep_unlisted: bool
) -> tuple[list[Path], dict[str, TensorInfo], dict[str, dict[str, str]], list[str], bool]:
    """torch.save's .bin weights, by transformers' names only (a folder's other .bin files,
    training_args.bin or optimizer.bin, are not weights)."""
    from qcli import torchbin

    if (folder / torchbin.INDEX_NAME).exists():
        files, tensors, metadata, warnings = _from_index(
            folder, torchbin.INDEX_NAME, None, keep_unlisted, torchbin.SHARD_GLOB, torchbin.read_bin
        )
        return files, tensors, metadata, warnings, True
    files = [folder / torchbin.SINGLE_NAME]
    tensors, metadata = _from_files(files, torchbin.read_bin)
    return files, tensors, metadata, [], False


def _from_files(
    files: Sequence[Path], read: HeaderReader
) -> tuple[dict[str, TensorInfo], dict[str, dict[str, str]]]:
    """Unindexed files: every tensor of every file, each name in one file only."""
    tensors: dict[str, TensorInfo] = {}
    metadata = {}
    for f in files:
        meta, hdr = read(f)
        metadata[f.name] = meta
        for tname, info in hdr.items():
            if tname in tensors:
                raise CheckpointError(
                    f"tensor {tname!r} appears in both {tensors[tname].file.name} and {f.name}"
                )
            tensors[tname] = info
    return tensors, metadata


def _refuse_weightless(folder: Path) -> None:
    bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt*")
    )
    if bins:
        raise CheckpointError(
            f"{folder}: only PyTorch pickle weights ({bins[0]}); qcli reads safetensors, or"
            " torch.save's zip format under transformers' names (pytorch_model.bin, or its"
            " index and shards). Convert them first, e.g. with transformers' save_pretrained"
        )
    raise CheckpointError(f"{folder}: no *.safetensors weights found")


def _unlisted(
    headers: Mapping[str, Mapping[str, TensorInfo]],
    wmap: Mapping[str, str],
    tensors: dict[str, TensorInfo] | None,
    index_name: str = INDEX_NAME,
) -> list[str]:
    """A warning naming each tensor that a listed shard holds but the index does not name,
    and, given `tensors`, those tensors added to it: dropping one silently once cost a model
    its lm_head (transformers loads by the index and would leave such a weight freshly
    initialized). A second copy of a listed tensor in another shard is left out, since the
    index says which copy is meant."""
    warnings = []
    for shard in sorted(headers, key=natural_key):
        for tname, info in headers[shard].items():
            if tname in wmap:
                if wmap[tname] != shard:
                    warnings.append(
                        f"{shard} also holds {tname!r}, which {index_name} maps to"
                        f" {wmap[tname]}: that copy is used"
                    )
                continue
            if tensors is None:
                warnings.append(f"{shard} holds {tname!r}, which {index_name} does not list")
                continue
            if tname in tensors:  # in two shards, neither named by the index
                raise CheckpointError(
                    f"tensor {tname!r} appears in both {tensors[tname].file.name} and {shard},"
                    f" and {index_name} names neither"
                )
            tensors[tname] = info
            warnings.append(
                f"{shard} holds {tname!r}, which {index_name} does not list: kept (transformers"
                " would load the source without it)"
            )
    return warnings


def buffer_of(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes, without numpy or a copy."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """Read one tensor into fresh memory (not a view of a memory map)."""
    rows = info.shape[0] if info.shape else 1
    return read_rows(info, fd, 0, rows) if info.shape else read_rows(info, fd, 0, 1).reshape(())


def read_rows(info: TensorInfo, fd: int | None, r0: int, r1: int) -> torch.Tensor:
    """Read rows [r0, r1) along the first dimension into fresh memory."""
    import torch

    dtype = getattr(torch, DTYPES[info.dtype][1])
    shape = (r1 - r0, *info.shape[1:]) if info.shape else (1,)
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes == 0:
        return out
    start = info.start + r0 * (nbytes // max(1, r1 - r0))
    own = fd is None
    if own:
        try:
            fd = os.open(info.file, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{info.file.name}: cannot open ({e.strerror})") from None
    try:
        buf, pos = buffer_of(out), 0
        while pos < nbytes:
            n = os.preadv(fd, [buf[pos : pos + _MAX_IO]], start + pos)
            if n <= 0:
                raise CheckpointError(f"{info.file.name}: tensor {info.name!r} is truncated")
            pos += n
    finally:
        if own:
            os.close(fd)
    return out
