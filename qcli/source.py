"""Where a checkpoint comes from: a local folder, or a hub repo id through huggingface_hub.

The hub path downloads only what a quantize run needs (weights, index, configs, tokenizer and
generation files; PyTorch .bin weights only for a repo without safetensors), honours
HF_HUB_OFFLINE and the standard cache, and reports the resolved commit so the output's
provenance names exactly what was read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcli.errors import InputError
from qcli.tensors import INDEX_NAME, Checkpoint, open_checkpoint

# What a quantize run reads or copies: weights, index, configs, tokenizer and generation
# files, chat templates, remote code that config.json's auto_map may point at.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.tiktoken",
    "*.py",
    "*.md",
]
# PyTorch weights, under the names transformers loads (never training_args.bin and the like):
# fetched only for a repo without safetensors, as transformers prefers those when both exist.
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class Source:
    folder: Path
    spec: str  # what the user typed
    repo_id: str | None = None
    revision: str | None = None  # resolved commit for hub sources

    def provenance(self) -> dict[str, str | None]:
        if self.repo_id:
            return {"repo_id": self.repo_id, "revision": self.revision}
        return {"path": str(self.folder.resolve())}


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and ".." not in spec and not spec.endswith((".", "-"))


def local_folder(spec: str, revision: str | None = None) -> Path | None:
    """The local folder SRC names, or None when it is a hub repo id.

    A spec that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x/``), or whose
    first part is a local folder (``models/qwen2`` where ``models/`` exists), is a path even
    when nothing is there: a typo then says "no such folder" at once instead of asking the
    hub for a repo that does not exist."""
    if not spec.strip():
        raise InputError("SRC is empty (an unset variable?); give a checkpoint folder or repo id")
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{spec}: not a folder (give the checkpoint's folder)")
        if revision:
            raise InputError("--revision applies to hub repo ids, not local folders")
        return p
    first = spec.split("/", 1)[0]
    pathlike = (
        spec.startswith((".", "/", "~"))
        or spec.endswith("/")
        or spec.count("/") > 1
        or ("/" in spec and Path(first).is_dir())
    )
    if pathlike or not looks_like_repo_id(spec):
        hint = _close_match(p)
        raise InputError(
            f"{spec}: no such folder"
            + (f" (did you mean {hint}?)" if hint else "")
            + ("" if pathlike else ", and not a hub repo id (org/name)")
        )
    return None


def _close_match(path: Path) -> str | None:
    import difflib

    parent = path.parent
    try:
        names = [q.name for q in parent.iterdir() if q.is_dir()]
    except OSError:
        return None
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return str(parent / close[0]) if close else None


def resolve(spec: str, revision: str | None = None, token: str | None = None) -> Source:
    """A local folder as is; otherwise download (or find in the cache) a hub snapshot."""
    folder = local_folder(spec, revision)
    if folder is not None:
        return Source(folder, spec)
    return _download(spec, revision, token)


def _download(repo_id: str, revision: str | None, token: str | None) -> Source:
    from huggingface_hub import snapshot_download

    from qcli.hub import hub_errors, reachable

    try:
        with hub_errors(repo_id, revision):
            local = not reachable(repo_id, revision, token)
            folder = snapshot_download(
                repo_id,
                revision=revision,
                token=token,
                allow_patterns=ALLOW_PATTERNS,
                local_files_only=local,
            )
            if not local and not _has_safetensors(Path(folder)):
                # the .bin weights of the same commit (the snapshot folder's name); offline,
                # the cached snapshot holds whatever an earlier run fetched
                folder = snapshot_download(
                    repo_id,
                    revision=Path(folder).name,
                    token=token,
                    allow_patterns=BIN_PATTERNS,
                )
    except ValueError as e:  # HFValidationError: a malformed repo id or revision
        raise InputError(f"{repo_id}: cannot fetch ({str(e).splitlines()[0]})") from None
    path = Path(folder)
    # snapshot folders are named by commit hash: that is the exact revision read.
    return Source(path, repo_id, repo_id, path.name)


def _has_safetensors(folder: Path) -> bool:
    """What qcli.tensors reads first: a safetensors index or any safetensors file."""
    return (folder / INDEX_NAME).exists() or any(folder.glob("*.safetensors"))


@dataclass
class Opened:
    """A checkpoint and where it came from (for people, scripts and provenance)."""

    checkpoint: Checkpoint
    source: dict[str, Any]
    label: str  # what to call it on screen


def open_headers(spec: str, revision: str | None = None, token: str | None = None) -> Opened:
    """A local folder, or a hub repo id read without its weights (qcli.hub): headers and
    configs only, for inspect and --dry-run."""
    path = local_folder(spec, revision)
    if path is not None:
        ck = open_checkpoint(path)
        return Opened(ck, {"path": str(path.resolve())}, str(path))
    from qcli import hub

    h = hub.open_repo(spec, revision, token)
    src = {
        "repo_id": h.repo_id,
        "revision": h.commit,
        "headers_fetched": h.remote_files,
        "headers_cached": h.cached_files,
    }
    return Opened(h.checkpoint, src, f"{h.repo_id}@{h.commit[:12]}")


def fetch_files(opened: Opened, weights: set[str]) -> Source:
    """A hub source read by its headers (open_headers): download the named weight files and
    every file that is not weights (configs, tokenizer) at its pinned commit, so one part of
    a split run fetches only the shards it reads. A local folder is returned as it is."""
    folder = opened.checkpoint.folder
    repo_id, commit = opened.source.get("repo_id"), opened.source.get("revision")
    if not repo_id:
        return Source(folder, str(folder))
    from huggingface_hub import snapshot_download

    from qcli.hub import hub_errors, reachable

    patterns = [p for p in ALLOW_PATTERNS if p != "*.safetensors"] + sorted(weights)
    with hub_errors(repo_id, commit):
        got = snapshot_download(
            repo_id,
            revision=commit,
            allow_patterns=patterns,
            local_files_only=not reachable(repo_id, commit, None),
        )
    return Source(Path(got), repo_id, repo_id, Path(got).name)
