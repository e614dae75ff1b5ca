"""A conversion cut into parts that write disjoint output shards, on any number of machines.

The plan fixes every output shard's contents from headers alone, so every machine computes
the same shard jobs (qcli.convert.shard_jobs) and part I of N takes its share of them
(:func:`assign`: balanced by bytes, the same everywhere). A part writes only its own shards
into OUT, each under a temporary name, fsynced, then renamed: a shard with its final name is
complete. Next to them, in OUT/.qcli-parts/, it records each shard's size and SHA-256 and the
run's key (a digest of the plan), so a part run again keeps what an earlier run of the same
plan finished and writes the rest: a lost worker resumes. `finish` checks that every planned
shard is there with its planned size, then writes the rest of the checkpoint (index,
config.json last) and removes the records: only then does OUT look complete.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcli import __version__, outdir
from qcli.convert import (
    SHARD_METADATA,
    Executor,
    ProgressFn,
    Result,
    ShardJob,
    TensorFn,
    default_workers,
    write_metadata,
)
from qcli.errors import InputError, OutputError
from qcli.planner import Plan
from qcli.shards import encode_header, order

PARTS_DIR = ".qcli-parts"
TMP_SUFFIX = ".qcli-part-tmp"
STAGE = ".qcli-finish-tmp"
_SPLIT = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Split:
    """Part `index` (1-based) of `count`."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_split(text: str) -> Split:
    m = _SPLIT.match(text)
    if m is None:
        raise InputError(f"--part {text!r}: give I/N, e.g. --part 2/8 (part 2 of 8)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 1 <= index <= count:
        raise InputError(f"--part {text}: I must be between 1 and N (N at least 1)")
    return Split(index, count)


def shard_size(job: ShardJob) -> int:
    """The planned size of a shard's file: header and tensors."""
    slots = order(job.slots)
    head, _ = encode_header(slots, SHARD_METADATA)
    return len(head) + sum(s.nbytes for s in slots)


def assign(jobs: Sequence[ShardJob], count: int) -> list[list[ShardJob]]:
    """The shards of each part: largest first, each to the part with the fewest bytes so far
    (ties: the lower part). Deterministic: every machine computes the same split."""
    parts: list[list[ShardJob]] = [[] for _ in range(count)]
    load = [0] * count
    by_size = sorted(range(len(jobs)), key=lambda i: (-shard_size(jobs[i]), i))
    for i in by_size:
        p = min(range(count), key=lambda k: (load[k], k))
        parts[p].append(jobs[i])
        load[p] += shard_size(jobs[i])
    for p in parts:
        p.sort(key=lambda j: jobs.index(j))
    return parts


def run_key(plan: Plan, jobs: Sequence[ShardJob]) -> str:
    """A digest of everything that decides the shards' bytes: qcli's version, the options,
    each shard's tensors and the source bytes they come from (names, offsets, sizes; not
    paths, which differ from machine to machine)."""
    body = {
        "qcli": __version__,
        "scheme": plan.scheme.name,
        "options": repr(plan.options),
        "files": sorted((f.name, f.stat().st_size) for f in plan.checkpoint.files if f.exists()),
        "shards": [
            [
                job.name,
                [
                    [tp.source, tp.action, tp.info.file.name, tp.info.start, tp.info.nbytes]
                    + [[s.name, s.dtype, list(s.shape)] for s in tp.outputs]
                    for tp in job.tensors
                ],
            ]
            for job in jobs
        ],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class PartResult:
    split: Split
    out: Path
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # finished by an earlier run of this part
    bytes_in: int = 0  # source bytes this run read
    bytes_part: int = 0  # source bytes of all the part's shards, kept ones included
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "part": str(self.split),
            "out": str(self.out),
            "written": self.written,
            "kept": self.kept,
            "bytes_in": self.bytes_in,
            "bytes_part": self.bytes_part,
            "seconds": round(self.seconds, 3),
        }


def source_files(jobs: Sequence[ShardJob]) -> set[Path]:
    """The source files the jobs read (a part of a hub repo downloads these only)."""
    files: set[Path] = set()
    for job in jobs:
        for tp in job.tensors:
            files.add(tp.info.file)
            stored = tp.stored
            for extra in (getattr(stored, "scale", None), getattr(stored, "source", None)):
                if extra is not None:
                    files.add(extra.file)
    return files


def run_part(
    plan: Plan,
    out: Path,
    jobs: Sequence[ShardJob],
    split: Split,
    *,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    on_tensor: TensorFn | None = None,
    sync: bool = True,
) -> PartResult:
    """Write part `split`'s shards into `out` (created if needed), keeping those an earlier
    run of the same plan finished."""
    t0 = time.perf_counter()
    out = Path(os.path.abspath(out))
    mine = assign(jobs, split.count)[split.index - 1]
    key = run_key(plan, jobs)
    _prepare(plan, out, jobs)
    result = PartResult(split, out)
    result.bytes_part = sum(tp.bytes_in for job in mine for tp in job.tensors)
    with _part_lock(out, split):
        for job in mine:
            _remove(out / f".{job.name}{TMP_SUFFIX}")  # a killed run's
        todo = []
        for job in mine:
            if _finished(out, job, key):
                result.kept.append(job.name)
                if progress:
                    progress(sum(tp.bytes_in for tp in job.tensors), job.name)
            else:
                todo.append(job)
        if todo:
            files = sorted(source_files(todo))
            with Executor(files, workers or default_workers(), progress, on_tensor) as ex:
                for job in todo:
                    _write_shard(ex, out, job, key, split, sync)
                    result.written.append(job.name)
                    result.bytes_in += sum(tp.bytes_in for tp in job.tensors)
    result.seconds = time.perf_counter() - t0
    return result


def finish(
    plan: Plan,
    out: Path,
    jobs: Sequence[ShardJob],
    record: dict[str, Any],
    sync: bool = True,
) -> Result:
    """Check every planned shard is in `out` with its planned size, then write the rest of
    the checkpoint; config.json comes last, so OUT looks complete only when it is."""
    t0 = time.perf_counter()
    out = Path(os.path.abspath(out))
    if not out.is_dir():
        raise InputError(f"{out} does not exist: run the parts (--part I/N) first")
    if (out / "config.json").exists():
        raise InputError(f"{out} is already a complete checkpoint (config.json is there)")
    key = run_key(plan, jobs)
    for job in jobs:
        _check_shard(out, job, key)
    stage = out / STAGE
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        files = write_metadata(plan, stage, list(jobs), record, sync)
        made = sorted(p.name for p in stage.iterdir())
        for name in [n for n in made if n != "config.json"] + ["config.json"]:
            os.replace(stage / name, out / name)
        outdir.fsync_dir(out)
    except OSError as e:
        raise OutputError(f"finishing {outdir.short(out)} failed: {e.strerror or e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    size = sum((out / f).stat().st_size for f in files)
    return Result(out, files, plan.bytes_in, size, time.perf_counter() - t0, plan.counts())


# --- one shard --------------------------------------------------------------------------------


def _write_shard(
    ex: Executor, out: Path, job: ShardJob, key: str, split: Split, sync: bool
) -> None:
    tmp = out / f".{job.name}{TMP_SUFFIX}"
    try:
        ex.write(job, tmp, sync)
        digest = _sha256(tmp)
        os.rename(tmp, out / job.name)
        _write_json(
            out / PARTS_DIR / f"{job.name}.json",
            {"key": key, "part": str(split), "size": shard_size(job), "sha256": digest},
        )
        if sync:
            outdir.fsync_dir(out)
    except BaseException:
        with outdir.signals_held():
            _remove(tmp)
        raise


def _finished(out: Path, job: ShardJob, key: str) -> bool:
    """A shard an earlier run of this plan wrote completely: size and digest as recorded."""
    path, rec = out / job.name, _record(out, job)
    if rec is None or not path.is_file() or rec.get("key") != key:
        return False
    size = shard_size(job)
    return rec.get("size") == size == path.stat().st_size and rec.get("sha256") == _sha256(path)


def _check_shard(out: Path, job: ShardJob, key: str) -> None:
    path = out / job.name
    if not path.is_file():
        raise InputError(
            f"{outdir.short(path)} is missing: run the part that writes it (--part I/N) again"
        )
    want, got = shard_size(job), path.stat().st_size
    if got != want:
        raise InputError(
            f"{outdir.short(path)} is {got} bytes, the plan says {want} (truncated, or from"
            " another run): run its part again"
        )
    rec = _record(out, job)
    if rec is not None and rec.get("key") != key:
        raise InputError(
            f"{outdir.short(path)} was written for another plan (other options or source):"
            " run its part again with these options"
        )


def _record(out: Path, job: ShardJob) -> dict[str, Any] | None:
    try:
        data = json.loads((out / PARTS_DIR / f"{job.name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- OUT -------------------------------------------------------------------------------------


def _prepare(plan: Plan, out: Path, jobs: Sequence[ShardJob]) -> None:
    """OUT exists, and holds nothing but this run's shards and records: a part never writes
    into, or deletes from, a folder with anything else in it."""
    if out.resolve() == plan.checkpoint.folder.resolve():
        raise InputError("OUT is SRC: the output needs a folder of its own")
    names = {j.name for j in jobs}
    ours = names | {f".{n}{TMP_SUFFIX}" for n in names} | {PARTS_DIR, STAGE}
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if "config.json" in foreign:
            raise InputError(f"{out} is a complete checkpoint already: give the parts a new OUT")
        if foreign:
            raise InputError(
                f"{out} holds files that are not this run's shards ({', '.join(foreign[:3])}"
                f"{' …' if len(foreign) > 3 else ''}): give the parts an empty or new folder"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / PARTS_DIR).mkdir(exist_ok=True)
    except OSError as e:
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            raise OutputError(f"cannot create {outdir.short(out)}: a file is in the way") from None
        raise outdir.path_error(out, e) from None


@contextmanager
def _part_lock(out: Path, split: Split) -> Iterator[None]:
    """One live run per part: a second one (a retry while the first still runs) stops."""
    path = out / PARTS_DIR / f"part-{split.index}-of-{split.count}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"part {split} of {out} is being written by another run") from None
        yield
    finally:
        os.close(fd)


def _write_json(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def _sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
