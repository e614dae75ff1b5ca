"""qcli_provenance.json: what a qcli output was made from, with which options, and its files.

Loaders ignore the file. verify reads the source back from it (to compare every layer with
the dense original by default), and --overwrite reads the list of files qcli wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NAME = "qcli_provenance.json"


def read(folder: Path) -> dict[str, Any] | None:
    """The record in `folder`, or None when there is none qcli wrote."""
    try:
        record = json.loads((folder / NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "qcli" else None


def files_written(folder: Path) -> set[str]:
    """The files the run that made `folder` wrote there (what --overwrite may replace)."""
    files = (read(folder) or {}).get("files")
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def source(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The recorded source ({"path": ...} or {"repo_id", "revision"}), and a note saying why
    there is none when there is none: no record, or a record without a source."""
    if not (folder / NAME).exists():
        return None, f"no {NAME}"
    record = read(folder)
    if record is None:
        return None, f"{NAME} is unreadable"
    src = record.get("source")
    if not isinstance(src, dict) or not (src.get("path") or src.get("repo_id")):
        return None, f"{NAME} records no source"
    return src, ""


def write(folder: Path, record: dict[str, Any]) -> None:
    (folder / NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
