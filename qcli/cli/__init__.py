"""The command line: parsing and rendering only; every decision lives in the library modules.

Each command sits in its own module and registers itself on `app`. Heavy modules (torch,
transformers) are imported inside commands, so `qcli --help` stays instant.
"""

from qcli.cli import eval_cmd, inspect_cmd, quantize_cmd, verify_cmd  # noqa: F401  (registers)
from qcli.cli.app import app, main

__all__ = ["app", "main"]
