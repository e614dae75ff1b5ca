"""`qcli --help` is instant and the header-only commands stay torch-free.

torch takes seconds to import and compressed-tensors several more; a CLI that pulls them in
for `--help` or `inspect` feels broken. Each check runs a fresh interpreter, the way a user
runs qcli, and looks at what it imported; benchmarks/ times it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# Run exactly what the console script runs, then report which heavy top-level modules it
# loaded, and which of qcli's own header-path modules `--help` should not need.
_PROBE = """
import sys
from qcli.cli.app import main
code = main(sys.argv[1:])
heavy = {"torch", "transformers", "compressed_tensors", "safetensors", "numpy",
         "huggingface_hub"}
loaded = sorted({m.split(".")[0] for m in sys.modules} & heavy)
extra = sorted(m for m in sys.modules if m in ("rich.markdown", "qcli.report", "qcli.plan"))
print(code, loaded, extra, file=sys.stderr)
"""


def _probe(*args: str) -> tuple[None, str]:
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=60
    )
    return None, r.stderr.strip().splitlines()[-1]


def test_help_is_light() -> None:
    # What --help imports decides its speed; the time itself is measured in benchmarks/
    # (never in a unit test: a busy machine would make it flaky).
    _, line = _probe("--help")
    assert line == "0 [] []", line  # no torch, hub client, rich markdown, plan


@pytest.mark.parametrize("command", ["inspect", "quantize", "verify"])
def test_command_help_imports_nothing_heavy(command: str) -> None:
    _, line = _probe(command, "--help")
    assert line.startswith("0 [] "), line


def test_inspect_local_folder_is_torch_free(models) -> None:
    _, line = _probe("inspect", str(models["llama-sharded"]), "--scheme", "W8A8")
    assert line.startswith("0 [] "), line
