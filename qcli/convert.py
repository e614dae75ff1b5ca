"""Execute a Plan into OUT: stream, quantize, write, then rename into place.

Per-channel scales depend on one output row alone, so a weight is processed in blocks of
rows: read a block, quantize it, write it at its final offset. Every block is an independent
task, which lets a small thread pool overlap reading, math (torch releases the GIL) and
writing on every core, while memory stays at a few blocks whatever the model's size. Dense
tensors are copied file-to-file by the kernel and never enter this process's memory.

Nothing appears at OUT until everything is written and flushed: the work happens in a hidden
sibling folder that is renamed into place at the end, and removed on any failure or signal.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcli import __version__
from qcli.errors import InputError, OutputError
from qcli.plan import COPY, Plan, TensorPlan, shard_layout
from qcli.tensors import (
    DTYPES,
    INDEX_NAME,
    ShardWriter,
    TensorInfo,
    index_json,
)

PROVENANCE_NAME = "qcli_provenance.json"
MODEL_CARD_NAME = "README.md"
MODEL_CARD_MARK = "<!-- qcli model card -->"
# Source files that are weights (re-written, never copied) or qcli's own artifacts.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json", PROVENANCE_NAME}
BLOCK_BYTES = 16 << 20  # source bytes per task: big enough to amortize, small enough for cache
COPY_BYTES = 64 << 20
READ_AHEAD = 256 << 20  # source bytes requested from the disk ahead of the block tasks


@dataclass
class Result:
    out: Path
    files: list[str]
    bytes_in: int
    bytes_out: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)


ProgressFn = Callable[[int, str], None]  # (source bytes just finished, tensor name)


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


def check_output_path(plan: Plan, out: Path, overwrite: bool) -> None:
    try:
        src = plan.checkpoint.folder.resolve()
        dst = out.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise OutputError(f"cannot resolve {out}: {e}") from None
    if dst == src or src in dst.parents:
        raise InputError(f"output {out} is inside the source checkpoint {src}")
    if dst in src.parents:
        raise InputError(f"output {out} contains the source checkpoint {src}")
    if _exists(out) and not overwrite:
        raise OutputError(f"{out} already exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if overwrite and out.is_dir() and not out.is_symlink():
        _check_replaceable(out)


# What --overwrite may delete besides qcli's own output: the files of a Hugging Face checkpoint.
_CHECKPOINT_FILES = re.compile(
    r"""(config|generation_config|preprocessor_config|processor_config|tokenizer_config
        |special_tokens_map|added_tokens|tokenizer|vocab|chat_template)\.json
      |.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?
      |tokenizer\.model|spiece\.model|sentencepiece\..*model|vocab\.txt|merges\.txt
      |chat_template\.jinja|""" + re.escape(PROVENANCE_NAME),
    re.VERBOSE,
)


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces an empty folder, qcli's own output, or a checkpoint, nothing else:
    an OUT that names someone's notes (or an unset $OUT that names the working folder) must
    not lose a file. qcli's output lists what it wrote in its provenance."""
    try:
        entries = sorted(out.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise OutputError(f"cannot read {out}: {e.strerror}") from None
    written = _files_written(out)
    for p in entries:
        name = p.name
        ours = name in written or _CHECKPOINT_FILES.fullmatch(name) or _is_model_card(p)
        if not ours or p.is_dir() or p.is_symlink():
            raise OutputError(
                f"--overwrite would delete {p}, which is not part of a checkpoint; it replaces"
                " only an empty folder or a checkpoint (move the file, or choose another OUT)"
            )


def _files_written(out: Path) -> set[str]:
    try:
        record = json.loads((out / PROVENANCE_NAME).read_text(encoding="utf-8"))
        files = record.get("files") if record.get("tool") == "qcli" else None
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _is_model_card(path: Path) -> bool:
    if path.name != MODEL_CARD_NAME or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MODEL_CARD_MARK in f.read(1 << 16)
    except OSError:
        return False


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while a failed run cleans up, so a second Ctrl-C (or a process
    manager's repeated SIGTERM) cannot cut the cleanup short and leave a partial folder."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change handlers, and only it receives the signals
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            # None: a handler installed outside Python, which cannot be put back
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _remove_stale_temps(out: Path) -> None:
    """Remove temporary folders of earlier runs on OUT that were killed (SIGKILL, OOM, power
    loss) before they could clean up: the caller holds OUT's lock, so none of them is live."""
    prefix = f".{out.name}.qcli-tmp-"
    try:
        stale = [
            p
            for p in out.parent.iterdir()
            if p.name.startswith(prefix) and p.name[len(prefix) :].isdigit()
        ]
    except OSError:
        return
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _torch_loading() -> Iterator[threading.Event]:
    """Import torch in the background (1-3 s) while dense tensors are copied and the first
    weights are read ahead; the event is set once torch runs one thread per block task.

    Parallelism comes from the block tasks; torch's own intra-op threads on top of them
    oversubscribe the cores, and on a busy machine its many tiny parallel regions each wait on a
    descheduled thread (measured: 0.05-0.18 GB/s instead of 0.28 with one thread per task)."""
    ready = threading.Event()
    state: dict[str, int] = {}

    def load() -> None:
        import torch

        state["prev"] = torch.get_num_threads()
        torch.set_num_threads(1)
        ready.set()

    loader = threading.Thread(target=load, name="qcli-import-torch", daemon=True)
    loader.start()
    try:
        yield ready
    finally:
        loader.join()
        if "prev" in state:
            import torch

            torch.set_num_threads(state["prev"])


def _advise(fd: int, start: int, length: int) -> None:
    """Ask the kernel to start reading a range now (asynchronously): on a cold page cache the
    disk then streams while the CPU quantizes what has already arrived."""
    try:
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass  # only a hint


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One writer per OUT: a second run gets a clear error instead of a mixed folder."""
    lock_path = out.parent / f".{out.name}.qcli.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot write in {out.parent}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"another qcli run is writing {out}") from None
        _remove_stale_temps(out)
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


def convert(
    plan: Plan,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    provenance: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    sync: bool = True,
) -> Result:
    """Write `plan` to `out` atomically; returns what was written."""
    # Absolute, so that "." or "x/.." get a real name for their temporary sibling and lock.
    out = Path(os.path.abspath(out))
    check_output_path(plan, out, overwrite)
    # Parent folders this run creates are removed again if it fails: nothing left behind.
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        in_the_way = isinstance(e, (FileExistsError, NotADirectoryError))
        why = "a file is in the way" if in_the_way else e.strerror
        raise OutputError(f"cannot create {out.parent}: {why}") from None
    t0 = time.perf_counter()
    try:
        with _locked(out):
            check_output_path(plan, out, overwrite)  # again, now that no one else writes OUT
            tmp = out.parent / f".{out.name}.qcli-tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir()
                files = _write_all(
                    plan, tmp, max_shard_size, progress, workers or default_workers(), sync
                )
                _write_metadata(plan, tmp, provenance or {}, files, sync)
                _replace(tmp, out, overwrite)
            except BaseException as e:
                with _signals_held():
                    shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, OSError):  # e.g. disk full writing config.json or the index
                    where = f" ({Path(e.filename).name})" if e.filename else ""
                    raise OutputError(f"writing {out} failed: {e.strerror or e}{where}") from None
                raise
    except BaseException:
        with _signals_held():
            for p in created:  # innermost first; stops at the first one not empty
                try:
                    p.rmdir()
                except OSError:
                    break
        raise
    return Result(
        out, files, plan.bytes_in, plan.bytes_out, time.perf_counter() - t0, plan.counts()
    )


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    # No signal may land between the two renames: OUT would be gone and the result deleted.
    with _signals_held():
        try:
            if overwrite and _exists(out):
                old = out.parent / f".{out.name}.qcli-old-{os.getpid()}"
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except OSError:
                    os.rename(old, out)  # put the previous result back
                    raise
                if old.is_symlink():  # OUT was a link: drop the link, never its target's files
                    old.unlink()
                else:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
            _fsync_dir(out.parent)
        except OSError as e:
            raise OutputError(f"cannot move the result into {out}: {e.strerror}") from None


def _exists(path: Path) -> bool:
    """Whether anything, even a dangling symlink, is at `path`."""
    return path.exists() or path.is_symlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(
    plan: Plan,
    tmp: Path,
    max_shard_size: int,
    progress: ProgressFn | None,
    workers: int,
    sync: bool,
) -> list[str]:
    shards = shard_layout(plan, max_shard_size)
    files: list[str] = []
    src_fds: dict[Path, int] = {}
    meta = {"format": "pt"}
    try:
        for f in plan.checkpoint.files:
            src_fds[f] = os.open(f, os.O_RDONLY)
        with (
            _torch_loading() as ready,
            ThreadPoolExecutor(workers, thread_name_prefix="qcli") as pool,
        ):
            for fname, tplans in shards:
                slots = [s for tp in tplans for s in tp.outputs]
                writer = ShardWriter(tmp / fname, slots, meta)
                try:
                    _run_shard(plan, writer, tplans, src_fds, pool, workers, progress, ready)
                except BaseException:
                    writer.abort()
                    raise
                writer.close(sync=sync)
                files.append(fname)
    except OSError as e:
        raise OutputError(f"cannot read or write: {e}") from None
    finally:
        for fd in src_fds.values():
            os.close(fd)
    if len(shards) > 1:
        wmap = {s.name: fname for fname, tps in shards for tp in tps for s in tp.outputs}
        total = sum(tp.bytes_out for _, tps in shards for tp in tps)
        (tmp / INDEX_NAME).write_text(index_json(wmap, total), encoding="utf-8")
        files.append(INDEX_NAME)
    return files


def _run_shard(
    plan: Plan,
    writer: ShardWriter,
    tplans: list[TensorPlan],
    src_fds: dict[Path, int],
    pool: ThreadPoolExecutor,
    workers: int,
    progress: ProgressFn | None,
    ready: threading.Event,
) -> None:
    """Run every block task of one shard, at most `2 * workers` in flight (bounded memory).

    Dense copies go first (they need no torch, which may still be loading), and the source
    bytes of the next READ_AHEAD are always requested from the disk ahead of the tasks."""
    limit = 2 * workers
    inflight: dict[Future, tuple[TensorPlan, int]] = {}
    left: dict[str, int] = {}
    scales: dict[str, list] = {}
    lock = threading.Lock()

    def finish(fut: Future) -> None:
        tp, nbytes = inflight.pop(fut)
        part = fut.result()  # re-raises a task's error here, in the main thread
        key = tp.outputs[0].name  # not tp.source: an untied lm_head shares its source
        if part is not None:
            scales[key].append(part)
        left[key] -= 1
        if left[key] == 0:
            _finish_tensor(plan, writer, tp, scales.pop(key))
        if progress:
            with lock:
                progress(nbytes, tp.source)

    ordered = sorted(tplans, key=lambda tp: tp.action != COPY)  # stable: file order kept
    infos = [plan.checkpoint.tensors[tp.source] for tp in ordered]
    starts = [0]  # where each tensor starts in the stream of source bytes, in task order
    for info in infos:
        starts.append(starts[-1] + info.nbytes)
    advised = 0
    try:
        for i, (tp, info) in enumerate(zip(ordered, infos, strict=True)):
            while advised < len(infos) and starts[advised] < starts[i] + READ_AHEAD:
                nxt = infos[advised]
                _advise(src_fds[nxt.file], nxt.start, nxt.nbytes)
                advised += 1
            tasks = list(_tasks(plan, writer, tp, info, src_fds[info.file], ready))
            left[tp.outputs[0].name] = len(tasks)
            scales[tp.outputs[0].name] = []
            for fn, nbytes in tasks:
                while len(inflight) >= limit:
                    done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                    for fut in done:
                        finish(fut)
                inflight[pool.submit(fn)] = (tp, nbytes)
        while inflight:
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in done:
                finish(fut)
    except BaseException:
        # Every running block must finish before the caller closes the shard's descriptor.
        with _signals_held():
            for fut in inflight:
                fut.cancel()
            wait(inflight)
        raise


def _tasks(
    plan: Plan,
    writer: ShardWriter,
    tp: TensorPlan,
    info: TensorInfo,
    fd: int,
    ready: threading.Event,
) -> Iterator[tuple[Callable[[], Any], int]]:
    """The independent block tasks for one tensor, each with the source bytes it covers."""
    if tp.action == COPY:
        name = tp.outputs[0].name
        if info.nbytes == 0:
            yield (lambda: None), 0
            return
        for pos in range(0, info.nbytes, COPY_BYTES):
            n = min(COPY_BYTES, info.nbytes - pos)
            yield (lambda pos=pos, n=n: writer.copy_from(name, fd, info.start + pos, pos, n)), n
        return
    rows, cols = info.shape
    row_bytes = cols * DTYPES[info.dtype][0]
    step = max(1, BLOCK_BYTES // row_bytes)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield (
            (lambda r0=r0, r1=r1: _quantize_block(plan, writer, tp, info, fd, r0, r1, ready)),
            (r1 - r0) * row_bytes,
        )


def _quantize_block(
    plan: Plan,
    writer: ShardWriter,
    tp: TensorPlan,
    info: TensorInfo,
    fd: int,
    r0: int,
    r1: int,
    ready: threading.Event,
) -> Any:
    """Read rows [r0, r1) of a weight, quantize them, write them; returns their scales."""
    ready.wait()
    from qcli import quant
    from qcli.tensors import read_rows

    scheme = plan.scheme
    w = read_rows(info, fd, r0, r1)
    scale_dtype = _torch_dtype(tp.outputs[1].dtype)
    try:
        qmax = plan.options.int8_max if scheme.kind == "int8" else None
        q, scale = quant.quantize_weight(w, scheme.kind, scale_dtype, qmax=qmax)
    except quant.NonFiniteWeightError as e:
        raise InputError(
            f"tensor {tp.source!r} holds a non-finite value ({e.value}) in row {r0 + e.row};"
            " refusing to quantize it"
        ) from None
    except ValueError as e:  # e.g. a scale that overflows the checkpoint's dtype
        raise InputError(f"tensor {tp.source!r}: {e}") from None
    cols = info.shape[1]
    if scheme.packed:
        packed = quant.pack_int8(q)
        writer.write_at(tp.outputs[0].name, r0 * (cols // 4) * 4, packed)
    else:
        writer.write_at(tp.outputs[0].name, r0 * cols * q.element_size(), q)
    return (r0, scale)


def _finish_tensor(plan: Plan, writer: ShardWriter, tp: TensorPlan, parts: list | None) -> None:
    """All blocks of a tensor are in: write its scales (and shape), mark it complete."""
    if tp.action == COPY:
        writer.done(tp.outputs[0].name)
        return
    import torch

    scale = torch.cat([s for _, s in sorted(parts, key=lambda p: p[0])])
    weight_slot, scale_slot = tp.outputs[0], tp.outputs[1]
    writer.write(scale_slot.name, scale)
    if plan.scheme.packed:
        shape_slot = tp.outputs[2]
        out_f, in_f = plan.checkpoint.tensors[tp.source].shape
        writer.write(shape_slot.name, torch.tensor([out_f, in_f], dtype=torch.int64))
    writer.done(weight_slot.name)


def _torch_dtype(st_dtype: str):
    import torch

    return getattr(torch, DTYPES[st_dtype][1])


def _write_metadata(
    plan: Plan, tmp: Path, provenance: dict[str, Any], files: list[str], sync: bool
) -> None:
    (tmp / "config.json").write_text(
        json.dumps(plan.config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    src = plan.checkpoint.folder
    for p in sorted(src.iterdir()):
        if (
            p.name.startswith(".")
            or p.name in _NOT_COPIED
            or p.name.endswith(_NOT_COPIED_SUFFIXES)
            or not p.is_file()
        ):
            continue
        shutil.copyfile(p, tmp / p.name)
        files.append(p.name)
    files[:0] = ["config.json"]
    files.append(PROVENANCE_NAME)
    record = {
        "tool": "qcli",
        "version": __version__,
        "source": provenance.get("source"),
        "options": provenance.get("options"),
        "scheme": plan.scheme.name,
        "lm_head": plan.lm_head,
        "untied_lm_head": plan.untie,
        "quantized_modules": len(plan.quantized),
        # what --overwrite may replace later: this run's files and nothing else
        "files": sorted(files),
    }
    (tmp / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if sync:
        for name in ("config.json", PROVENANCE_NAME):
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
