"""qcli: quantize Hugging Face checkpoints to 8-bit compressed-tensors, and verify them."""

__version__ = "0.1.0"
