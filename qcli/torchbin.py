"""PyTorch ``.bin`` checkpoints (torch.save's zip format) read as TensorInfo, without torch.

torch.save writes a zip archive: ``<prefix>/data.pkl``, the state dict pickled with each
tensor as a call to a rebuild function whose persistent id names its storage, and one stored
(uncompressed) member ``<prefix>/data/<key>`` per storage. qcli unpickles data.pkl with an
unpickler that knows only the globals of a plain state dict and builds inert records instead
of tensors: nothing in the file can run, and torch is never imported (inspect stays light).
Each tensor then becomes a TensorInfo whose byte range lies inside its storage's member, so
every reader (quantize, verify's reference) preads it exactly like a safetensors tensor, and
memory stays at the pickle's size whatever the model's (as with torch.load(mmap=True,
weights_only=True), whose tensors the tests compare byte for byte).
"""

from __future__ import annotations

import io
import math
import pickle
import re
import stat
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from qcli.errors import CheckpointError
from qcli.tensors import DTYPES, TORCH_TO_ST, TensorInfo

SINGLE_NAME = "pytorch_model.bin"
INDEX_NAME = "pytorch_model.bin.index.json"
SHARD_GLOB = "pytorch_model*.bin"  # what transformers' index names: pytorch_model-0000i-of-N.bin
# data.pkl is ~200 bytes a tensor: even a million tensors fit well below this.
MAX_PICKLE_BYTES = 512 * 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field

# Legacy storage classes (what torch.save names for the classic dtypes) -> safetensors dtype;
# None: a storage torch allows but qcli cannot read (complex, quantized).
_STORAGES: dict[str, str | None] = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "UntypedStorage": "U8",  # bytes; the tensor's dtype comes with _rebuild_tensor_v3
}
_STORAGE_NAME = re.compile(r"^[A-Z]\w*Storage$")
_DTYPE_NAME = re.compile(r"^(u?int\d+|float\d+\w*|bfloat16|complex\d+|bool|q\w+|bits\w+)$")


# Everything the unpickler hands out or builds is a NamedTuple: immutable, with no __dict__
# and no __setstate__, so the pickle's BUILD opcode can change none of them. (A frozen
# dataclass with slots would not do: its generated __setstate__ sets fields regardless.)
class _Marker(NamedTuple):
    """What find_class hands the pickle for a type or dtype: a name, never the real object."""

    kind: str  # "storage", "dtype" or "type"
    name: str
    dtype: str | None = None  # safetensors dtype, when qcli reads it


class _Storage(NamedTuple):
    key: str
    dtype: str | None
    type_name: str
    numel: int  # elements of `dtype` (bytes for an untyped storage)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0] if self.dtype else 0


class _Tensor(NamedTuple):
    storage: _Storage
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str | None
    dtype_name: str


class _Refused(Exception):
    """Raised inside the unpickler; turned into a CheckpointError naming the file."""


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise _Refused(f"a tensor's {what} is {value!r:.60}, not a tuple of sizes")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: _Marker | None) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor is rebuilt from something other than a storage")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise _Refused(f"a tensor's storage offset is {offset!r:.40}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise _Refused(f"a tensor has size {shape} but stride {strides}")
    if dtype is None:
        return _Tensor(storage, offset, shape, strides, storage.dtype, storage.type_name)
    return _Tensor(storage, offset, shape, strides, dtype.dtype, dtype.name)


class _Call(NamedTuple):
    """A callable handed to the pickle (immutable: see _Marker)."""

    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _OrderedDict(dict):
    """collections.OrderedDict as a state dict uses it: a dict whose attributes (a module's
    ``_metadata``, set by the pickle's BUILD) are kept and ignored."""


# Stand-ins for the rebuild functions a state dict calls, with torch's signatures: they
# build records, never tensors.
def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    return _tensor(storage, offset, size, stride, None)  # (..., requires_grad, hooks, metadata)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Tensor:
    # (..., requires_grad, hooks, dtype, metadata): dtypes newer than the storage classes
    dtype = rest[2] if len(rest) > 2 else None
    if not isinstance(dtype, _Marker) or dtype.kind != "dtype":
        raise _Refused("a tensor is rebuilt with something other than a dtype")
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data  # a Parameter's bytes are its tensor's; requires_grad and hooks do not matter


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # torch's path for a tensor that carries Python attributes: the attributes are not
    # weights; only a plain Tensor or Parameter is accepted, never another class.
    if not (isinstance(new_type, _Marker) and new_type.kind == "type"):
        raise _Refused("a tensor is rebuilt as a class that is not torch.Tensor")
    if not (isinstance(func, _Call) and func.fn in _REBUILDS):
        raise _Refused("a tensor is rebuilt by a function that is not torch's")
    if not isinstance(args, tuple):
        raise _Refused("a tensor's rebuild arguments are not a tuple")
    return func(*args)


_REBUILDS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)
_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": _Call(_OrderedDict),
    "torch._utils._rebuild_tensor_v2": _Call(_rebuild_tensor_v2),
    "torch._utils._rebuild_tensor_v3": _Call(_rebuild_tensor_v3),
    "torch._utils._rebuild_parameter": _Call(_rebuild_parameter),
    "torch._utils._rebuild_parameter_with_state": _Call(_rebuild_parameter),
    "torch._tensor._rebuild_from_type_v2": _Call(_rebuild_from_type_v2),
    "torch.Tensor": _Marker("type", "Tensor"),
    "torch.nn.parameter.Parameter": _Marker("type", "Parameter"),
}


def _shown(s: str) -> str:
    return s if s.isprintable() and len(s) <= 120 else ascii(s)[:120]


class _StateDictUnpickler(pickle.Unpickler):
    """Every global goes through find_class (GLOBAL, STACK_GLOBAL, INST, OBJ and the
    copyreg extension codes alike): only the names above come back, as frozen records or
    stand-ins that build them; nothing of torch's, nothing that reaches the interpreter."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _GLOBALS:
            return _GLOBALS[full]
        if module in ("torch", "torch.cuda", "torch.storage") and _STORAGE_NAME.match(name):
            return _Marker("storage", name, _STORAGES.get(name))
        if module == "torch" and _DTYPE_NAME.match(name):
            return _Marker("dtype", name, TORCH_TO_ST.get(name))
        if module == "torch._utils" and name.startswith("_rebuild_"):
            raise _Refused(
                f"it holds a tensor that {_shown(full)} rebuilds (quantized, sparse or a"
                " subclass): qcli reads plain dense tensors only"
            )
        raise _Refused(
            f"refused to unpickle global {_shown(full)}: a state dict needs only tensors,"
            " and qcli never unpickles code"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _Marker)
            and pid[1].kind == "storage"
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
            and not isinstance(pid[4], bool)
            and pid[4] >= 0
        ):
            raise _Refused(f"persistent id {pid!r:.60} is not a storage")
        kind, key, numel = pid[1], pid[2], pid[4]
        storage = _Storage(key, kind.dtype, kind.name, numel)
        seen = self.storages.setdefault(key, storage)
        if seen != storage:
            raise _Refused(f"storage {key!r} is described twice, differently")
        return seen


def read_bin(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Every tensor of one torch zip ``.bin`` file, as a HeaderReader returns them (no
    metadata: a .bin has none); one-line CheckpointError for anything else."""
    name = path.name
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open forever
            raise CheckpointError(f"{name}: not a regular file")
        with open(path, "rb") as f:
            _check_magic(name, f.read(len(_ZIP_MAGIC)))
            with zipfile.ZipFile(f) as z:
                return {}, _tensors(path, f, z, st.st_size)
    except (zipfile.BadZipFile, NotImplementedError, EOFError) as e:  # also a bad data.pkl CRC
        raise CheckpointError(f"{name}: not a valid zip archive ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from None


def _check_magic(name: str, head: bytes) -> None:
    if head == _ZIP_MAGIC:
        return
    if head[:1] == b"\x80":  # PROTO: a bare pickle, torch.save before torch 1.6
        raise CheckpointError(
            f"{name}: legacy PyTorch format (a bare pickle: torch < 1.6, or"
            " _use_new_zipfile_serialization=False), which qcli does not read; re-save it in"
            " the zip format: torch.save(torch.load(path, weights_only=True), path)"
        )
    raise CheckpointError(
        f"{name}: not a PyTorch checkpoint (neither torch.save's zip format nor a legacy pickle)"
    )


def _tensors(
    path: Path, f: io.BufferedReader, z: zipfile.ZipFile, size: int
) -> dict[str, TensorInfo]:
    name = path.name
    members = z.infolist()
    names = [m.filename for m in members]
    if len(set(names)) != len(names):  # zipfile and torch's reader might pick different ones
        raise CheckpointError(f"{name}: the zip archive names a member twice")
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"{name}: a zip archive, but not torch.save's (no single data.pkl)")
    prefix = pickles[0].removesuffix("data.pkl")
    by_name = {m.filename: m for m in members}
    order = by_name.get(prefix + "byteorder")
    if order is not None and z.read(order).strip() != b"little":
        raise CheckpointError(f"{name}: saved on a big-endian machine; qcli reads little-endian")
    state = _unpickle(name, z, by_name[pickles[0]])
    tensors: dict[str, TensorInfo] = {}
    starts: dict[str, int] = {}
    for tname, t in state.items():
        key = prefix + "data/" + t.storage.key
        if key not in by_name:
            raise CheckpointError(f"{name}: tensor {tname!r}: its storage {key} is missing")
        if key not in starts:
            starts[key] = _member_start(name, f, by_name[key], t.storage, size)
        tensors[tname] = _info(path, tname, t, starts[key])
    return tensors


def _unpickle(name: str, z: zipfile.ZipFile, member: zipfile.ZipInfo) -> dict[str, _Tensor]:
    if member.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{name}: data.pkl is {member.file_size} bytes (corrupt?)")
    up = _StateDictUnpickler(z.read(member))
    try:
        state = up.load()
    except _Refused as e:
        raise CheckpointError(f"{name}: {e}") from None
    except Exception as e:  # noqa: BLE001  (a hostile pickle can raise anything; none runs code)
        first = (str(e).splitlines() or [""])[0][:120]
        raise CheckpointError(
            f"{name}: data.pkl is not a readable state dict ({type(e).__name__}: {first})"
        ) from None
    if isinstance(state, _Tensor):
        raise CheckpointError(f"{name}: holds one tensor, not a state dict (name -> tensor)")
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: holds a {type(state).__name__}, not a state dict")
    for k, v in state.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{name}: state dict key {k!r:.60} is not a string")
        if not isinstance(v, _Tensor):
            kind = "dict" if isinstance(v, dict) else type(v).__name__
            raise CheckpointError(
                f"{name}: {k!r} is a {kind}, not a tensor (qcli reads a flat state dict, as"
                " transformers saves it)"
            )
    return state


def _member_start(
    name: str, f: io.BufferedReader, m: zipfile.ZipInfo, storage: _Storage, size: int
) -> int:
    """The absolute offset of a storage member's first byte, which must be stored as is."""
    if m.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"{name}: storage {m.filename} is compressed; torch.save stores every storage"
            " uncompressed (re-save it with torch.save)"
        )
    if m.flag_bits & 0x1:
        raise CheckpointError(f"{name}: storage {m.filename} is encrypted")
    if storage.dtype is not None and m.file_size != storage.nbytes:
        raise CheckpointError(
            f"{name}: storage {m.filename} holds {m.file_size} bytes but its pickle says"
            f" {storage.nbytes}"
        )
    f.seek(m.header_offset)
    head = f.read(_LOCAL_HEADER)
    if len(head) < _LOCAL_HEADER or head[:4] != _ZIP_MAGIC:
        raise CheckpointError(f"{name}: storage {m.filename}: bad zip local header")
    n, extra = struct.unpack("<HH", head[26:30])
    start = m.header_offset + _LOCAL_HEADER + n + extra
    if start + m.file_size > size:
        raise CheckpointError(f"{name}: storage {m.filename} is truncated")
    return start


def _info(path: Path, tname: str, t: _Tensor, member_start: int) -> TensorInfo:
    where = f"{path.name}: tensor {tname!r}"
    if t.dtype is None or t.storage.dtype is None:
        raise CheckpointError(f"{where}: dtype {t.dtype_name}, which qcli does not read")
    if t.storage.type_name != "UntypedStorage" and t.dtype != t.storage.dtype:
        raise CheckpointError(f"{where}: dtype {t.dtype} differs from its storage's")
    item = DTYPES[t.dtype][0]
    numel = math.prod(t.shape)
    if numel and not _row_major(t.shape, t.stride):
        raise CheckpointError(
            f"{where}: a strided view (shape {list(t.shape)}, stride {list(t.stride)}); qcli"
            " reads row-major tensors only: re-save with every tensor .contiguous()"
        )
    start = t.offset * item
    if start + numel * item > t.storage.nbytes:
        raise CheckpointError(
            f"{where}: reaches past the end of its storage ({t.storage.nbytes} bytes)"
        )
    begin = member_start + start if numel else member_start
    return TensorInfo(tname, t.dtype, t.shape, path, begin, begin + numel * item)


def _row_major(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """torch's is_contiguous: a dimension of size 1 may have any stride."""
    expected = 1
    for d, s in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and s != expected:
            return False
        expected *= d
    return True
