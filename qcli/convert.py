"""Execute a Plan into OUT: shard jobs of row blocks, each checked before it is written.

Per-channel scales depend on one output row alone, so a weight is processed in blocks of
rows: read a block, quantize it, check it against the error bound, write it at its final
offset. Every block is an independent task, which lets a small thread pool overlap reading,
math (torch releases the GIL) and writing on every core, while memory stays at a few blocks
whatever the model's size. Dense tensors are copied file-to-file by the kernel and never
enter this process's memory. Each output shard is a job of its own: the plan fixes every
shard's contents, so jobs can run in any order (qcli.outdir makes the folder atomic).
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcli import __version__, card, outdir, provenance
from qcli.errors import InputError, InternalError
from qcli.planner import COPY, QUANTIZE, Plan, TensorPlan
from qcli.sharding import shard_layout
from qcli.shards import ShardWriter, index_json
from qcli.tensors import DTYPES, INDEX_NAME

# Source files that are weights (re-written, never copied) or qcli's own artifacts.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = {
    "config.json",
    INDEX_NAME,
    "pytorch_model.bin.index.json",
    provenance.NAME,
    card.NAME,  # the source's model card goes into qcli's own, below it
}
BLOCK_BYTES = 16 << 20  # source bytes per task: big enough to amortize, small enough for cache
COPY_BYTES = 64 << 20
READ_AHEAD = 256 << 20  # source bytes requested from the disk ahead of the block tasks
SHARD_METADATA = {"format": "pt"}

ProgressFn = Callable[[int, str], None]  # (source bytes just finished, tensor name)
TensorFn = Callable[[TensorPlan], None]  # a tensor is complete (verbose: one line each)


@dataclass
class Result:
    out: Path
    files: list[str]
    bytes_in: int
    bytes_out: int  # bytes of the files written, headers included
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardJob:
    """One output file and the tensors it holds: an independent piece of work."""

    name: str
    tensors: tuple[TensorPlan, ...]

    @property
    def slots(self) -> list:
        return [s for tp in self.tensors for s in tp.outputs]


def shard_jobs(plan: Plan, max_shard_size: int) -> list[ShardJob]:
    return [ShardJob(name, tuple(tps)) for name, tps in shard_layout(plan, max_shard_size)]


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


def convert(
    plan: Plan,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    provenance: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    on_tensor: TensorFn | None = None,
    workers: int | None = None,
    sync: bool = True,
) -> Result:
    """Write `plan` to `out` atomically; returns what was written.

    `provenance`: what qcli_provenance.json says about the run (source, options)."""
    t0 = time.perf_counter()
    jobs = shard_jobs(plan, max_shard_size)
    out = Path(os.path.abspath(out))
    with outdir.transaction(plan.checkpoint.folder, out, overwrite) as tmp:
        with Executor(
            plan.checkpoint.files, workers or default_workers(), progress, on_tensor
        ) as ex:
            for job in jobs:
                ex.write(job, tmp / job.name, sync)
        files = write_metadata(plan, tmp, jobs, provenance or {}, sync)
        size = sum((tmp / f).stat().st_size for f in files)
    return Result(out, files, plan.bytes_in, size, time.perf_counter() - t0, plan.counts())


def write_metadata(
    plan: Plan,
    folder: Path,
    jobs: list[ShardJob],
    record: dict[str, Any],
    sync: bool,
) -> list[str]:
    """Everything of a checkpoint but its shards: the index (sharded output only: loaders
    read a lone model.safetensors without one), config.json, the source's other files
    (tokenizer, generation config, license, ...), the model card and the provenance. Returns
    every file name of the output, shards included."""
    files = [job.name for job in jobs]
    if len(jobs) > 1:
        wmap = {s.name: job.name for job in jobs for s in job.slots}
        total = sum(s.nbytes for job in jobs for s in job.slots)
        (folder / INDEX_NAME).write_text(index_json(wmap, total), encoding="utf-8")
        files.append(INDEX_NAME)
    import json

    (folder / "config.json").write_text(
        json.dumps(plan.config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    copied = []
    for p in sorted(plan.checkpoint.folder.iterdir()):
        if (
            p.name.startswith(".")
            or p.name in _NOT_COPIED
            or p.name.endswith(_NOT_COPIED_SUFFIXES)
            or not p.is_file()
        ):
            continue
        shutil.copyfile(p, folder / p.name)
        copied.append(p.name)
    source_card = plan.checkpoint.folder / card.NAME
    text = (
        source_card.read_text(encoding="utf-8", errors="replace") if source_card.is_file() else None
    )
    (folder / card.NAME).write_text(card.render(plan, record, text), encoding="utf-8")
    files = ["config.json", *files, *copied, card.NAME, provenance.NAME]
    provenance.write(
        folder,
        {
            "tool": "qcli",
            "version": __version__,
            "source": record.get("source"),
            "options": record.get("options"),
            "scheme": plan.scheme.name,
            "lm_head": plan.lm_head,
            "untied_lm_head": plan.untie,
            "quantized_modules": len(plan.quantized),
            # what --overwrite may replace later: this run's files and nothing else
            "files": sorted(files),
        },
    )
    if sync:
        for name in ("config.json", provenance.NAME):
            outdir.fsync_file(folder / name)
    return files


# --- the executor ---------------------------------------------------------------------------


class Executor:
    """Runs shard jobs: a thread pool, the open source files, torch loading meanwhile.

    At most `2 * workers` block tasks are in flight, so memory is bounded by a few blocks."""

    def __init__(
        self,
        files: list[Path],
        workers: int,
        progress: ProgressFn | None = None,
        on_tensor: TensorFn | None = None,
    ):
        self.paths, self.workers = files, workers
        self.progress, self.on_tensor = progress, on_tensor
        self.fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Executor:
        try:
            for f in self.paths:
                self.fds[f] = os.open(f, os.O_RDONLY)
        except OSError as e:
            self._close_fds()
            raise InputError(f"cannot read {Path(e.filename or '').name}: {e.strerror}") from None
        self._torch = _torch_loading()
        self.ready = self._torch.__enter__()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="qcli")
        # The block tasks allocate many short-lived objects and no cycles worth collecting:
        # the cyclic collector ran for 4% of a 2 GB run's samples (perf), for nothing.
        self._gc = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self._torch.__exit__(*exc)
        finally:
            if self._gc:
                gc.enable()
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def write(self, job: ShardJob, path: Path, sync: bool = True) -> None:
        """Write one shard file at `path` (which must not exist)."""
        writer = ShardWriter(path, job.slots, SHARD_METADATA)
        try:
            self._run(job, writer)
        except BaseException:
            writer.abort()
            raise
        writer.close(sync=sync)

    def _run(self, job: ShardJob, writer: ShardWriter) -> None:
        """Every block task of one shard. Dense copies go first (they need no torch, which may
        still be loading), and the source bytes of the next READ_AHEAD are always requested
        from the disk ahead of the tasks."""
        inflight: dict[Future, tuple[_TensorTasks, int]] = {}
        ordered = sorted(job.tensors, key=lambda tp: tp.action != COPY)  # stable: file order
        starts = [0]  # where each tensor starts in the stream of source bytes, in task order
        for tp in ordered:
            starts.append(starts[-1] + tp.info.nbytes)
        advised = 0
        try:
            for i, tp in enumerate(ordered):
                while advised < len(ordered) and starts[advised] < starts[i] + READ_AHEAD:
                    nxt = ordered[advised].info
                    _advise(self.fds[nxt.file], nxt.start, nxt.nbytes)
                    advised += 1
                tensor = _TensorTasks(tp, writer, self.fds, self.ready)
                for fn, nbytes in tensor.tasks():
                    while len(inflight) >= 2 * self.workers:
                        self._drain(inflight)
                    inflight[self.pool.submit(fn)] = (tensor, nbytes)
            while inflight:
                self._drain(inflight)
        except BaseException:
            # Every running block must finish before the caller closes the shard's descriptor.
            with outdir.signals_held():
                for fut in inflight:
                    fut.cancel()
                wait(inflight)
            raise

    def _drain(self, inflight: dict[Future, tuple[_TensorTasks, int]]) -> None:
        done, _ = wait(inflight, return_when=FIRST_COMPLETED)
        for fut in done:
            tensor, nbytes = inflight.pop(fut)
            tensor.block_done(fut.result())  # re-raises a task's error here, in this thread
            if tensor.complete and self.on_tensor:
                self.on_tensor(tensor.tp)
            if self.progress:
                with self._lock:
                    self.progress(nbytes, tensor.tp.source)


class _TensorTasks:
    """The block tasks of one tensor, and the scales they return until all are in."""

    def __init__(
        self, tp: TensorPlan, writer: ShardWriter, fds: dict[Path, int], ready: threading.Event
    ):
        self.tp, self.writer, self.fds, self.ready = tp, writer, fds, ready
        self.fd = fds[tp.info.file]
        self.left = 0
        self.scales: list[tuple[int, Any]] = []
        self.complete = False

    def tasks(self) -> list[tuple[Callable[[], Any], int]]:
        """The independent block tasks, each with the source bytes it covers."""
        tp, info = self.tp, self.tp.info
        out: list[tuple[Callable[[], Any], int]] = []
        if tp.action == COPY:
            name = tp.outputs[0].name
            for pos in range(0, info.nbytes, COPY_BYTES):
                n = min(COPY_BYTES, info.nbytes - pos)
                out.append(
                    (
                        lambda p=pos, n=n: self.writer.copy_from(
                            name, self.fd, info.start + p, p, n
                        ),
                        n,
                    )
                )
            out = out or [((lambda: None), 0)]
        else:
            rows, cols = info.shape
            row_bytes = cols * DTYPES[info.dtype][0]
            # a decoded source block is float32 in memory: size the block by that
            step = max(1, BLOCK_BYTES // (cols * 4 if tp.stored else row_bytes))
            if tp.stored is not None and tp.stored.whole:
                step = rows
            work = self.quantize if tp.action == QUANTIZE else self.dequantize
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                out.append(((lambda a=r0, b=r1: work(a, b)), (r1 - r0) * row_bytes))
        self.left = len(out)
        return out

    def quantize(self, r0: int, r1: int) -> tuple[int, Any]:
        """Read rows [r0, r1) of a weight, quantize and check them, write them; returns
        (r0, their scales)."""
        self.ready.wait()
        import torch

        from qcli import quant

        tp, qz = self.tp, self.tp.quantizer
        assert qz is not None
        w = self._dense_rows(r0, r1)
        scale_dtype = getattr(torch, DTYPES[qz.scale_dtype][1])
        try:
            q, scale = quant.quantize_weight(w, qz.qtype, scale_dtype, qmax=qz.qmax)
        except quant.NonFiniteWeightError as e:
            raise InputError(
                f"tensor {tp.source!r} holds a non-finite value ({e.value}) in row {r0 + e.row};"
                " refusing to quantize it"
            ) from None
        except ValueError as e:  # e.g. a scale that overflows the checkpoint's dtype
            raise InputError(f"tensor {tp.source!r}: {e}") from None
        bad = quant.check_block(w, q, scale, qz.qtype)
        if bad is not None:
            raise InternalError(
                f"row {r0 + bad} of {tp.source!r} misses the {qz.qtype} error bound after"
                " quantizing; nothing was written (a qcli bug: please report it)"
            )
        stored = qz.layout.encode(q)
        row_bytes = stored.shape[1] * stored.element_size()
        self.writer.write_at(tp.outputs[0].name, r0 * row_bytes, stored)
        return (r0, scale)

    def _dense_rows(self, r0: int, r1: int):
        """The weight's dense rows: as stored, or decoded from the source's quantization."""
        from qcli.tensors import read_rows

        if self.tp.stored is None:
            return read_rows(self.tp.info, self.fd, r0, r1)
        return self.tp.stored.rows(lambda t, a, b: read_rows(t, self.fds[t.file], a, b), r0, r1)

    def dequantize(self, r0: int, r1: int) -> None:
        """A quantized source weight kept dense: its decoded rows, in the output's dtype."""
        self.ready.wait()
        import torch

        slot = self.tp.outputs[0]
        w = self._dense_rows(r0, r1).to(getattr(torch, DTYPES[slot.dtype][1]))
        self.writer.write_at(slot.name, r0 * w.shape[1] * w.element_size(), w)

    def block_done(self, part: tuple[int, Any] | None) -> None:
        if part is not None:
            self.scales.append(part)
        self.left -= 1
        if self.left == 0:
            self._finish()

    def _finish(self) -> None:
        """All blocks of a tensor are in: write its scales (and shape), mark it complete."""
        tp = self.tp
        if tp.action != QUANTIZE:
            self.writer.done(tp.outputs[0].name)
        else:
            import torch

            qz = tp.quantizer
            assert qz is not None
            scale = torch.cat([s for _, s in sorted(self.scales, key=lambda p: p[0])])
            self.writer.write(tp.outputs[1].name, scale)
            if qz.layout.packed:
                self.writer.write(tp.outputs[2].name, qz.layout.shape_tensor(qz.shape))
            self.writer.done(tp.outputs[0].name)
        self.complete = True


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


__all__ = [
    "Executor",
    "Result",
    "ShardJob",
    "convert",
    "default_workers",
    "shard_jobs",
    "write_metadata",
]
