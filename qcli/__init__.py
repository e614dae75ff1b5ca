"""qcli: quantize Hugging Face checkpoints to 8-bit compressed-tensors, and verify them.

The Python API (qcli.api) is importable from here: ``qcli.quantize``, ``qcli.plan``,
``qcli.dry_run``, ``qcli.inspect``, ``qcli.verify``, ``qcli.eval``,
``qcli.sensitivity``; errors are in qcli.errors. The names
load lazily, so ``import qcli`` (and ``qcli --help``) stays instant.
"""

import warnings

# torch warns at import time when numpy is not installed; qcli never hands tensors to numpy,
# and the warning would land in the middle of a user's output.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"

_API = (
    "quantize",
    "quantize_part",
    "finish_parts",
    "quantize_on_ray",
    "plan",
    "dry_run",
    "inspect",
    "verify",
    "eval",
    "sensitivity",
    "plan_options",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from qcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'qcli' has no attribute {name!r}")
