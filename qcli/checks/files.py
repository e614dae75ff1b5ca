"""The files of a checkpoint: index, total size, safetensors metadata."""

from __future__ import annotations

import json

from qcli.checks.findings import WARNING, Contract
from qcli.tensors import INDEX_NAME, Checkpoint

LOADABLE_FILE_FORMATS = ("pt", "tf", "flax", "mlx")  # transformers refuses other values


def check_files(ck: Checkpoint, result: Contract) -> None:
    """The index, its total size and each file's metadata, as loaders read them."""
    for w in ck.warnings:
        result.add("index", INDEX_NAME, w, "loaders do not see it", WARNING)
    for fname, meta in ck.metadata.items():
        fmt = meta.get("format")
        if fmt is None:
            result.add(
                "files.metadata",
                fname,
                'no __metadata__ {"format": "pt"}',
                "transformers loads it, but tools that check the framework tag may not",
                WARNING,
            )
        elif fmt not in LOADABLE_FILE_FORMATS:
            result.add(
                "files.metadata",
                fname,
                f"__metadata__ format is {fmt!r}",
                "transformers refuses to load the file",
            )
    if not (ck.folder / INDEX_NAME).exists():
        return
    try:
        index = json.loads((ck.folder / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # open_checkpoint parsed it already; a race is not ours to report
    total = (index.get("metadata") or {}).get("total_size")
    actual = sum(t.nbytes for t in ck.tensors.values())
    if total is None:
        result.add(
            "index.total_size",
            INDEX_NAME,
            "no metadata.total_size",
            "loaders ignore it, but the hub and download tools show a wrong size",
            WARNING,
        )
    elif total != actual:
        result.add(
            "index.total_size",
            INDEX_NAME,
            f"metadata.total_size is {total} but the mapped tensors hold {actual} bytes",
            "loaders ignore it, but it shows the index was not written with these shards",
            WARNING,
        )
