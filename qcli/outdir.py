"""The output folder: nothing half-written ever appears at OUT, and nothing of a user's is lost.

The work happens in a hidden sibling folder (``.OUT.qcli-tmp-PID``), renamed into place only
when everything is written and flushed, under a lock so two runs cannot mix their files, and
removed on any failure or signal, together with any parent folder the run created. An
existing OUT is replaced only with --overwrite, and only when it holds nothing but a
checkpoint: an empty folder, qcli's own output (its provenance lists what it wrote), or the
config, weights, index, tokenizer and generation files of a Hugging Face checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qcli import card, provenance
from qcli.errors import InputError, OutputError


def check(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an OUT that cannot receive the result of converting `src` (before any work)."""
    try:
        source = src.resolve()
        dst = out.resolve()
        present = exists(out)
        folder = out.is_dir()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise path_error(out, e) from None
    if dst == source or source in dst.parents:
        raise InputError(f"output {out} is inside the source checkpoint {source}")
    if dst in source.parents:
        raise InputError(f"output {out} contains the source checkpoint {source}")
    if present and not overwrite:
        raise OutputError(f"{out} already exists (use --overwrite to replace it)")
    if present and out.exists() and not folder:
        raise OutputError(f"{out} exists and is not a folder")
    if overwrite and folder and not out.is_symlink():
        _check_replaceable(out)


def path_error(path: Path, e: BaseException) -> OutputError:
    """An OSError about OUT itself as one line (a long path shortened)."""
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        return OutputError(f"output path too long for the filesystem: {short(path)}")
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return OutputError(f"cannot use {short(path)}: {why}")


def short(path: Path | str, limit: int = 120) -> str:
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit - 40]}…{text[-39:]}"


# What --overwrite may delete besides qcli's own output: the files of a Hugging Face checkpoint.
_CHECKPOINT_FILES = re.compile(
    r"""(config|generation_config|preprocessor_config|processor_config|tokenizer_config
        |special_tokens_map|added_tokens|tokenizer|vocab|chat_template)\.json
      |.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?
      |tokenizer\.model|spiece\.model|sentencepiece\..*model|vocab\.txt|merges\.txt
      |chat_template\.jinja""",
    re.VERBOSE,
)


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces an empty folder, qcli's own output, or a checkpoint, nothing else:
    an OUT that names someone's notes (or an unset $OUT that names the working folder) must
    not lose a file."""
    try:
        entries = sorted(out.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise path_error(out, e) from None
    written = provenance.files_written(out)
    for p in entries:
        name = p.name
        ours = (
            name in written
            or name == provenance.NAME
            or _CHECKPOINT_FILES.fullmatch(name)
            or card.is_qcli_card(p)
        )
        if not ours or p.is_dir() or p.is_symlink():
            raise OutputError(
                f"--overwrite would delete {p}, which is not part of a checkpoint; it replaces"
                " only an empty folder or a checkpoint (move the file, or choose another OUT)"
            )


def exists(path: Path) -> bool:
    """Whether anything, even a dangling symlink, is at `path`."""
    return path.exists() or path.is_symlink()


@contextmanager
def signals_held() -> Iterator[None]:
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


@contextmanager
def transaction(src: Path, out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh temporary folder next to OUT, renamed into OUT when the block succeeds.

    On any failure or signal the folder is removed, and so are the parent folders this run
    created; OUT is untouched unless the rename happens. OSErrors become OutputErrors.
    """
    # Absolute, so that "." or "x/.." get a real name for their temporary sibling and lock.
    out = Path(os.path.abspath(out))
    check(src, out, overwrite)
    created = [p for p in (out.parent, *out.parent.parents) if not exists(p)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            raise OutputError(f"cannot create {short(out.parent)}: a file is in the way") from None
        raise path_error(out.parent, e) from None
    try:
        with _locked(out):
            check(src, out, overwrite)  # again, now that no one else writes OUT
            tmp = out.parent / f".{out.name}.qcli-tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir()
                yield tmp
                _replace(tmp, out, overwrite)
            except BaseException as e:
                with signals_held():
                    shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, OSError):  # e.g. disk full writing config.json or the index
                    where = f" ({Path(e.filename).name})" if e.filename else ""
                    raise OutputError(
                        f"writing {short(out)} failed: {e.strerror or e}{where}"
                    ) from None
                raise
    except BaseException:
        with signals_held():
            for p in created:  # innermost first; stops at the first one not empty
                try:
                    p.rmdir()
                except OSError:
                    break
        raise


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One writer per OUT: a second run gets a clear error instead of a mixed folder."""
    lock_path = out.parent / f".{out.name}.qcli.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise path_error(out, e) from None
        raise OutputError(f"cannot write in {short(out.parent)}: {e.strerror}") from None
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


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    # No signal may land between the two renames: OUT would be gone and the result deleted.
    with signals_held():
        try:
            if overwrite and exists(out):
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
            fsync_dir(out.parent)
        except OSError as e:
            raise OutputError(f"cannot move the result into {out}: {e.strerror}") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
