"""qcli: quantize Hugging Face checkpoints to 8-bit compressed-tensors, and verify them."""

import warnings

# torch warns at import time when numpy is not installed; qcli never hands tensors to numpy,
# and the warning would land in the middle of a user's output.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"
