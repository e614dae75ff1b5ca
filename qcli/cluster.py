"""`qcli quantize --ray`: the parts of a split run (qcli.parts) as Ray tasks, then --finish.

One task per output shard, so a lost worker costs one shard's work: Ray retries a task whose
worker died (and one that failed on I/O), and the part it reruns keeps nothing half-written
(qcli.parts writes each shard under a temporary name). SRC and OUT must be paths every node
sees (a shared filesystem) or a hub repo id; each task downloads the source shards it reads.
The plan is made here first, so bad options fail before the cluster does any work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcli.errors import InputError, OutputError

RETRIES = 3  # per task, for a dead worker or an I/O error


def run(
    src: str,
    out: Path,
    *,
    address: str | None,
    cpus: int,
    max_shard_size: str | int,
    revision: str | None,
    token: str | None,
    options: dict[str, Any],
    shards: int,
    progress: Callable[[int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every part on the cluster at `address` (RAY_ADDRESS when None; a local cluster
    when neither is set); returns each part's result (qcli.parts.PartResult.to_json)."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'qcli[ray]'") from None
    from qcli.parts import TMP_SUFFIX  # noqa: F401  (the workers import qcli: fail here first)

    _connect(ray, address or os.environ.get("RAY_ADDRESS") or None)
    try:
        task = ray.remote(
            num_cpus=cpus, max_retries=RETRIES, retry_exceptions=[OSError, OutputError]
        )(_part)
        kwargs = dict(
            revision=revision,
            token=token,
            max_shard_size=max_shard_size,
            workers=cpus,
            **options,
        )
        refs = {
            task.remote(src, str(out), f"{i}/{shards}", kwargs): i for i in range(1, shards + 1)
        }
        pending, results = list(refs), []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except Exception as e:
                cause = getattr(e, "cause", None) or e
                raise OutputError(
                    f"part {refs[done[0]]}/{shards} failed after {RETRIES} retries: {cause}"
                ) from None
            results.append(result)
            if progress:
                progress(result["bytes_part"], result["part"])
        return sorted(results, key=lambda r: int(r["part"].split("/")[0]))
    finally:
        ray.shutdown()


def _connect(ray: Any, address: str | None) -> None:
    try:
        # Ray's INFO lines ("Connecting to existing Ray cluster ...") are not qcli's to print
        ray.init(
            address=address,
            log_to_driver=False,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    except Exception as e:  # ConnectionError, RuntimeError, ...: Ray's own words say which
        raise InputError(f"cannot reach the Ray cluster at {address or 'local'}: {e}") from None


def _part(src: str, out: str, part: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One Ray task: a part of the run, on whichever node Ray picked."""
    from qcli import api

    return api.quantize_part(src, out, part, **kwargs).to_json()
