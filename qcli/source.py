"""Where a checkpoint comes from: a local folder, or a hub repo id through huggingface_hub.

The hub path downloads only what a quantize run needs (weights, index, configs, tokenizer and
generation files), honours HF_HUB_OFFLINE and the standard cache, and reports the resolved
commit so the output's provenance names exactly what was read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qcli.errors import InputError

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


def resolve(spec: str, revision: str | None = None, token: str | None = None) -> Source:
    """A local folder as is; otherwise download (or find in the cache) a hub snapshot."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{spec}: not a folder (give the checkpoint's folder)")
        if revision:
            raise InputError("--revision applies to hub repo ids, not local folders")
        return Source(p, spec)
    if not looks_like_repo_id(spec):
        raise InputError(f"{spec}: no such folder, and not a hub repo id (org/name)")
    return _download(spec, revision, token)


def _download(repo_id: str, revision: str | None, token: str | None) -> Source:
    from huggingface_hub import snapshot_download

    from qcli.hub import hub_errors

    try:
        with hub_errors(repo_id, revision):
            folder = snapshot_download(
                repo_id, revision=revision, token=token, allow_patterns=ALLOW_PATTERNS
            )
    except ValueError as e:  # HFValidationError: a malformed repo id or revision
        raise InputError(f"{repo_id}: cannot fetch ({str(e).splitlines()[0]})") from None
    path = Path(folder)
    # snapshot folders are named by commit hash: that is the exact revision read.
    return Source(path, repo_id, repo_id, path.name)
