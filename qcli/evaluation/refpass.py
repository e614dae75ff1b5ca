"""The reference pass in a process of its own (qcli.evaluation.scoring.reference_pass_apart):
reads the job as JSON on stdin, writes JSON lines on stdout (progress, or the error)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    from qcli.errors import QcliError

    job = json.loads(sys.stdin.read())

    def say(*msg) -> None:
        print(json.dumps(msg), flush=True)

    try:
        import torch

        from qcli.evaluation.engines import TransformersModel
        from qcli.evaluation.scoring import reference_pass
        from qcli.evaluation.windows import Windows

        folder = Path(job["folder"])
        dtype = getattr(torch, job["dtype"].removeprefix("torch."))
        wins = Windows(job["windows"], job["first"], job["bos"], job["ctx"])
        reference_pass(
            lambda: TransformersModel(folder, dtype),
            folder,
            wins,
            job["settings"],
            lambda *p: say("progress", *p),
        )
    except QcliError as e:
        say("error", str(e), e.exit_code)
        return 2
    except Exception as e:  # noqa: BLE001 (reported by the parent, as a bug)
        say("error", f"internal error in the reference pass: {type(e).__name__}: {e}", 4)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
