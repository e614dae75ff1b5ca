"""The model card qcli writes next to its output (README.md with the hub's YAML header).

Only the marker lives here for now: --overwrite recognizes qcli's own card by it.
"""

from __future__ import annotations

from pathlib import Path

NAME = "README.md"
MARK = "<!-- qcli model card -->"


def is_qcli_card(path: Path) -> bool:
    """Whether `path` is a model card qcli wrote (its first 64 KB hold the marker)."""
    if path.name != NAME or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARK in f.read(1 << 16)
    except OSError:
        return False
